"""Evaluation metrics and the cerebseg-eval command on small synthetic derivatives."""
import nibabel as nib
import numpy as np
import pytest

from cerebseg.bids_app.evaluate import main as eval_main
from cerebseg.utils.evaluation import dice_per_label, wilcoxon_p, whole_dice


def test_dice_and_wilcoxon():
    ref = np.array([0, 1, 1, 2, 2, 2, 0, 0])
    pred = np.array([0, 1, 2, 2, 2, 0, 0, 3])
    d = dice_per_label(pred, ref, [1, 2, 3, 4])
    assert d[0] == pytest.approx(2 * 1 / 3)
    assert d[1] == pytest.approx(2 * 2 / 6)
    assert d[2] == 0.0 and np.isnan(d[3])
    assert whole_dice(pred, ref) == pytest.approx(2 * 4 / 10)
    a = np.array([0.9, 0.8, 0.85, 0.95, 0.7, 0.88, 0.91, 0.83])
    assert wilcoxon_p(a, a) == 1.0
    assert wilcoxon_p(a, a - 0.05) < 0.01
    assert np.isnan(wilcoxon_p([0.1], [0.2]))


def _write(folder, sub, data, space='MNI152NLin2009cAsym_res-05'):
    label, *res = space.split('_')
    ents = '_'.join([f'space-{label}', 'seg-cerebellum'] + res)
    path = folder / f'sub-{sub}' / 'anat' / f'sub-{sub}_{ents}_dseg.nii.gz'
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.int16), np.eye(4)), path)


def test_eval_command(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ref_dir, good, bad = tmp_path / 'ref', tmp_path / 'good', tmp_path / 'bad'
    (ref_dir).mkdir()
    (ref_dir / 'seg-cerebellum_dseg.tsv').write_text(
        'index\tname\tabbreviation\tcolor\n0\tbackground\tBG\t#000000\n1\tLeft_A\tLA\t#ff0000\n'
        '2\tRight_A\tRA\t#00ff00\n')
    for i in range(6):
        ref = np.zeros((10, 10, 10), int)
        ref[2:5, 2:8, 2:8] = 1
        ref[5:8, 2:8, 2:8] = 2
        _write(ref_dir, f'{i:02d}', ref)
        noisy = ref.copy()
        flip = rng.random(ref.shape) < 0.02
        noisy[flip] = rng.integers(0, 3, flip.sum())
        _write(good, f'{i:02d}', noisy)
        worse = noisy.copy()
        worse[4, 2:8, 2:8] = 2  # a shifted boundary
        _write(bad, f'{i:02d}', worse)
    _write(bad, '99', ref)  # not in the reference: ignored
    out = tmp_path / 'res' / 'table.tsv'
    code = eval_main(['--reference', str(ref_dir), '--method', f'bad={bad}', '--method',
                      f'good={good}', '--out', str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert 'Left_A' in printed and 'Whole cerebellum' in printed and 'p good vs bad' in printed
    lines = out.read_text().splitlines()
    head = lines[0].split('\t')
    assert head[:5] == ['structure', 'bad_mean', 'bad_sd', 'good_mean', 'good_sd']
    row = dict(zip(head, next(ln for ln in lines if ln.startswith('Left_A')).split('\t')))
    assert float(row['good_mean']) > float(row['bad_mean'])
    assert float(row['p_good_vs_bad']) < 0.05 and row['n'] == '6'
    scores = (tmp_path / 'res' / 'table_scores.tsv').read_text().splitlines()
    assert len(scores) == 1 + 6 * 2 * 3  # 6 participants x 2 methods x (2 labels + whole)
    # usage errors exit 2, missing data 65
    assert eval_main(['--reference', str(ref_dir), '--method', 'x', '--out', str(out)]) == 2
    assert eval_main(['--reference', str(ref_dir), '--method', f'a={good}', '--space', 'T1w',
                      '--out', str(out)]) == 65
