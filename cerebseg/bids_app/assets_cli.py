"""``cerebseg-assets``: build (or fetch and build) the templates and atlas libraries."""
from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

from cerebseg import __version__
from cerebseg.assets import DEFAULT_BUILD, available_protocols, user_cache_dir
from cerebseg.errors import CerebsegError, missing_path_message

LOGGER = logging.getLogger('cerebseg.assets')


def _existing_dir(value: str, parser: argparse.ArgumentParser) -> Path:
    path = Path(value).expanduser().absolute()
    if not path.is_dir():
        parser.error(missing_path_message(path, 'Folder'))
    return path


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='cerebseg-assets', description='Build the templates and atlas libraries that '
        'cerebseg uses, from the public source files.')
    parser.add_argument('--version', action='version', version=f'cerebseg {__version__}')
    sub = parser.add_subparsers(dest='command', required=True)
    protocols = available_protocols()
    for name, helptext in (('build', 'build from source files already on disk'),
                           ('fetch', 'download the source files from their public URLs, '
                                     'then build')):
        cmd = sub.add_parser(name, help=helptext)
        if name == 'build':
            cmd.add_argument('--sources', required=True, type=Path,
                             help='folder with the source files (layout of '
                                  'cerebseg/data/sources.json, e.g. ../shared/data)')
        else:
            cmd.add_argument('--sources', type=Path, default=None,
                             help='where to download the source files (default: OUT/sources)')
        cmd.add_argument('--out', type=Path, default=user_cache_dir(),
                         help=f'assets folder to write (default: {user_cache_dir()})')
        cmd.add_argument('--library', action='append', choices=protocols, default=None,
                         help=f'atlas library (label protocol) to build; repeatable '
                              f'(default: {" and ".join(DEFAULT_BUILD)})')
        cmd.add_argument('--no-mirror', action='store_true',
                         help='do not add the left-right mirror of each library entry')
        cmd.add_argument('--no-brainstem', action='store_true',
                         help='do not build the brainstem label set')
        cmd.add_argument('--brainstem-navigator', metavar='DIR',
                         type=partial(_existing_dir, parser=parser), default=None,
                         help='your copy of the Brainstem Navigator nuclei in MNI152NLin6Asym '
                              '(DIR/<name>.nii.gz and DIR/Brainstem_Navigator_lookup.csv): adds '
                              'them to the brainstem label set. Its licence forbids '
                              'redistribution: the assets are marked restricted and must stay '
                              'on this machine')
        cmd.add_argument('--random-seed', type=int, default=0)
        cmd.add_argument('-v', '--verbose', action='count', default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cerebseg.assets.build import build_assets
    from cerebseg.assets.fetch import fetch_sources

    parser = _build_parser()
    opts = parser.parse_args(argv)
    if opts.brainstem_navigator and opts.no_brainstem:
        parser.error('--brainstem-navigator needs the brainstem label set: drop --no-brainstem')
    logging.basicConfig(level=logging.DEBUG if opts.verbose > 1 else logging.INFO,
                        format='%(asctime)s %(name)s %(levelname)s: %(message)s',
                        stream=sys.stderr)
    libraries = tuple(opts.library or DEFAULT_BUILD)
    # one ITK thread: ANTs' registrations are reproducible only so, and two builds from the
    # same sources must give the same assets (and so the same volumes)
    from cerebseg.utils.registration import set_itk_environment

    set_itk_environment(1)
    try:
        sources = opts.sources
        if opts.command == 'fetch':
            sources = fetch_sources(sources or opts.out / 'sources')
        elif not sources.is_dir():
            LOGGER.error('Source folder not found: %s', sources)
            return 2
        manifest = build_assets(sources, opts.out, libraries=libraries, seed=opts.random_seed,
                                mirror=not opts.no_mirror, brainstem=not opts.no_brainstem,
                                brainstem_navigator=opts.brainstem_navigator)
    except CerebsegError as err:
        LOGGER.error('%s', err)
        return err.exit_code
    LOGGER.info('Assets written: %s', manifest)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
