"""Load HTML reports in headless chromium: console messages, images that failed, a screenshot.

A harness page (beside the report, so the same ``file://`` folder) frames the report and,
after it has loaded, lists every <img>, <object> and inline <svg> with whether it rendered;
chromium prints the harness DOM (``--dump-dom``) and logs the pages' console messages to
stderr (``--enable-logging=stderr``): any ``CONSOLE`` line is a failure, as is an image with
no natural size.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = ('chromium', 'chromium-browser', 'google-chrome')

_HARNESS = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>
<iframe id="f" src="{page}" style="width:1200px;height:900px"></iframe>
<pre id="result">pending</pre>
<script>
document.getElementById('f').addEventListener('load', function () {{
  setTimeout(function () {{
    var doc = document.getElementById('f').contentDocument;
    var out = {{title: doc.title, images: [], svgs: 0, links: []}};
    doc.querySelectorAll('img').forEach(function (img) {{
      out.images.push({{src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0}});
    }});
    out.svgs = doc.querySelectorAll('svg').length;
    doc.querySelectorAll('a').forEach(function (a) {{
      var href = a.getAttribute('href') || a.getAttribute('xlink:href');
      if (href) {{ out.links.push(href); }}
    }});
    document.getElementById('result').textContent = JSON.stringify(out);
  }}, 1500);
}});
</script></body></html>
"""


def find_chromium() -> str | None:
    for name in CHROMIUM:
        path = shutil.which(name)
        if path:
            return path
    return None


def _flags(binary: str) -> list[str]:
    return [binary, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
            '--allow-file-access-from-files', '--no-first-run', '--disable-extensions']


def check_page(page: Path, screenshot: Path | None = None, timeout: float = 120) -> dict:
    """Load ``page``; returns ``{'title', 'images': [{'src', 'ok'}], 'svgs', 'links',
    'console': [lines]}`` and writes ``screenshot`` (PNG of the whole page) if given."""
    binary = find_chromium()
    if binary is None:
        raise RuntimeError('chromium is not installed (apt-get install chromium)')
    page = Path(page).resolve()
    harness = page.parent / f'.harness-{page.stem}.html'
    harness.write_text(_HARNESS.format(page=page.name))
    try:
        proc = subprocess.run(_flags(binary) + ['--enable-logging=stderr', '--v=0',
                                                '--virtual-time-budget=15000', '--dump-dom',
                                                harness.as_uri()],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        harness.unlink()
    match = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
    if not match or match.group(1).strip() == 'pending':
        raise RuntimeError(f'chromium did not finish loading {page}: {proc.stderr[-2000:]}')
    text = match.group(1).replace('&quot;', '"').replace('&lt;', '<').replace(
        '&gt;', '>').replace('&amp;', '&')
    result = json.loads(text)
    result['console'] = [ln for ln in proc.stderr.splitlines() if ':CONSOLE' in ln]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(_flags(binary) + [f'--screenshot={screenshot}',
                                         '--window-size=1200,3000', page.as_uri()],
                       capture_output=True, timeout=timeout, check=True)
    return result
