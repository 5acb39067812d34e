"""DeepCeres networks, checkpoints, losses, label tables, training and cascade (tiny arrays)."""
import dataclasses

import numpy as np
import pytest
import torch

from cerebseg.models import cascade, nets3d as seg
from cerebseg.models import checkpoint as cpt
from cerebseg.training import augment as aug
from cerebseg.training import cascade as tr
from cerebseg.models.losses import DeepCeresLoss, DiceCELoss
from cerebseg.utils import labels as lab

LABELS = [[0, 'background'], [1, 'Left_A'], [2, 'Vermis_A'], [3, 'Right_A'], [4, 'Left_B'],
          [5, 'Right_B']]


def test_default_sizes_match_the_paper():
    # T1w + T2w + prior over the 34 SUIT foreground classes = 36 channels, 35 classes
    unet = seg.build_model('unet', 36, 35)
    dpn = seg.build_model('dpn', 36, 35)
    assert abs(seg.count_parameters(unet) / 3_433_473 - 1) < 0.01
    assert abs(seg.count_parameters(dpn) / 696_177 - 1) < 0.01


@pytest.mark.parametrize('arch', sorted(seg.ARCHITECTURES))
def test_forward_shapes(arch):
    model = seg.build_model(arch, 3, 4, features=[8, 8, 8, 8]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 24, 8))
    assert out.shape == (2, 4, 16, 24, 8)
    assert model.divisor == 8


def test_dpn_has_no_learned_encoder():
    # every convolution of the DPN sees the pooled input: its blocks all start with C inputs
    model = seg.build_model('dpn', 5, 3, features=[16, 8, 4])
    first = [b[0].in_channels for b in model.blocks]
    assert first == [5, 5 + 8, 5 + 4]


def test_unknown_architecture():
    with pytest.raises(ValueError, match='unknown architecture'):
        seg.build_model('vnet', 1, 2)


def _save(tmp_path, model, inputs=('T1w', 'prior'), half=False, name='m.pt'):
    return cpt.save_cascade_net(tmp_path / name, model, architecture='dpn', inputs=inputs,
                               stage='lobules', labels=LABELS, spacing=0.5, protocol='suit',
                               training={'steps': 3}, half=half)


@pytest.mark.parametrize('half', [False, True])
def test_checkpoint_round_trip(tmp_path, half):
    model = seg.build_model('dpn', 6, 6, features=[8, 4]).eval()
    path = _save(tmp_path, model, half=half)
    loaded, meta = cpt.load_cascade_net(path, inputs=['prior', 'T1w'], stage='lobules',
                                       protocol='suit')
    assert meta['inputs'] == ['T1w', 'prior'] and meta['labels'] == LABELS
    assert meta['architecture'] == 'dpn' and meta['training'] == {'steps': 3}
    assert meta['cerebseg_version'] and meta['format_version'] == cpt.CASCADE_VERSION
    x = torch.randn(1, 6, 8, 8, 8)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.allclose(a, b, atol=5e-2 if half else 1e-6)
    if half:
        raw = torch.load(path, weights_only=True)
        assert raw['state_dict']['head.weight'].dtype == torch.float16


def test_checkpoint_refuses_other_inputs_and_foreign_files(tmp_path):
    model = seg.build_model('dpn', 6, 6, features=[8, 4])
    path = _save(tmp_path, model)
    with pytest.raises(cpt.CheckpointError, match='T1w\\+prior.*this run has T1w\\+T2w'):
        cpt.load_cascade_net(path, inputs=['T1w', 'T2w'])
    with pytest.raises(cpt.CheckpointError, match='hemisphere'):
        cpt.load_cascade_net(path, stage='hemisphere')
    with pytest.raises(cpt.CheckpointError, match='cobra'):
        cpt.load_cascade_net(path, protocol='cobra')
    assert cpt.CheckpointError.exit_code == 126
    # a hemisphere network (background / left / right) serves every protocol
    hemi = cpt.save_cascade_net(tmp_path / 'h.pt', seg.build_model('dpn', 3, 3, features=[8, 4]),
                                architecture='dpn', inputs=['T1w', 'prior'],
                                stage='hemisphere', labels=[[0, 'bg'], [1, 'Left'], [2, 'Right']],
                                spacing=1.0, protocol='suit')
    assert cpt.load_cascade_net(hemi, stage='hemisphere', protocol='cobra')[1]['protocol'] == 'suit'
    # strict keys: a renamed weight is refused
    ckpt = torch.load(path, weights_only=True)
    ckpt['state_dict']['extra.weight'] = ckpt['state_dict'].pop('head.weight')
    torch.save(ckpt, tmp_path / 'bad.pt')
    with pytest.raises(cpt.CheckpointError, match='do not fit'):
        cpt.load_cascade_net(tmp_path / 'bad.pt')
    torch.save({'state_dict': {}}, tmp_path / 'foreign.pt')
    with pytest.raises(cpt.CheckpointError, match='not a cerebseg segmentation'):
        cpt.load_cascade_net(tmp_path / 'foreign.pt')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(cpt.CheckpointError, match='not a readable'):
        cpt.load_cascade_net(tmp_path / 'junk.pt')
    with pytest.raises(cpt.CheckpointError, match='not found'):
        cpt.load_cascade_net(tmp_path / 'missing.pt')
    with pytest.raises(ValueError, match='T1w plus optional'):
        seg.check_inputs(['T2w', 'prior'])


def test_deepceres_loss_is_equation_1():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4, 4))
    p = torch.softmax(logits, 1).numpy()
    t = np.eye(3)[target.numpy()].transpose(0, 4, 1, 2, 3)
    dice = np.mean([(2 * (p[:, c] * t[:, c]).sum() + 1e-5) / (p[:, c].sum() + t[:, c].sum()
                                                              + 1e-5) for c in range(3)])
    bce = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    expected = np.log(((1 - dice) + bce) / 2)
    assert float(DeepCeresLoss()(logits, target)) == pytest.approx(expected, rel=1e-4)
    # better predictions, lower loss (both losses)
    good = 8 * torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    for loss in (DeepCeresLoss(), DiceCELoss()):
        assert float(loss(good, target)) < float(loss(logits, target))


def test_label_tables():
    perm = lab.swap_classes(LABELS)
    assert perm.tolist() == [0, 3, 2, 1, 5, 4]
    with pytest.raises(ValueError, match='no mirror'):
        lab.swap_classes([[0, 'background'], [1, 'Left_A']])
    classes = np.zeros((4, 1, 1), np.uint8)
    classes[:, 0, 0] = [1, 2, 2, 5]
    x_mm = np.array([-1.5, -0.5, 0.5, 1.5])
    assert lab.hemisphere_classes(classes, LABELS, x_mm)[:, 0, 0].tolist() == [1, 1, 2, 2]
    probs = np.random.default_rng(0).dirichlet(np.ones(6), (4, 1, 1)).transpose(3, 0, 1, 2)
    hp = lab.hemisphere_probs(probs, LABELS, x_mm)
    assert np.allclose(hp.sum(0), 1)
    assert np.allclose(hp[1, 0], probs[[1, 2, 4], 0].sum(0))  # left of the midline
    assert np.allclose(hp[2, 3], probs[[2, 3, 5], 3].sum(0))  # right of it: vermis goes right
    dseg = np.array([0, 1, 5, 3])
    assert lab.class_index(dseg, LABELS).tolist() == [0, 1, 5, 3]
    with pytest.raises(ValueError, match=r'\[9\]'):
        lab.class_index(np.array([9]), LABELS)


def _toy_subject(rng, shape=(24, 20, 16), name='s'):
    """Two lateral blobs and a midline one; T1w encodes the classes with noise."""
    x = np.arange(shape[0]) - shape[0] / 2 + 0.5
    classes = np.zeros(shape, np.uint8)
    classes[4:10, 5:15, 4:12] = 1    # Left_A
    classes[10:14, 5:15, 4:12] = 2   # Vermis_A
    classes[14:20, 5:15, 4:12] = 3   # Right_A
    classes[4:10, 15:18, 4:12] = 4   # Left_B
    classes[14:20, 15:18, 4:12] = 5  # Right_B
    t1 = (np.array([0, 1.0, 0.6, 1.0, 0.3, 0.3])[classes] + rng.normal(0, 0.05, shape))
    onehot = np.eye(6)[classes].transpose(3, 0, 1, 2)
    prior = np.rint(255 * (0.7 * onehot + 0.3 / 6)).astype(np.uint8)
    return tr.Subject(name, t1.astype(np.float32), x, prior=prior, classes=classes)


def test_flip_swaps_classes_and_prior_channels():
    rng = np.random.default_rng(0)
    s = _toy_subject(rng)
    image, target, labels = tr.stage_arrays(s, 'lobules', ['T1w', 'prior'], LABELS)
    image = np.asarray(image)
    assert image.shape == (6,) + s.t1.shape and image.dtype == np.float32
    perm = lab.swap_classes(labels)
    fimg, ftgt = aug.flip_lr(image, target, perm, n_mr=1)
    # the prior channels still describe the (flipped, swapped) target
    fg = ftgt > 0
    assert np.array_equal(fimg[1:].argmax(0)[fg] + 1, ftgt[fg])
    assert np.array_equal(ftgt[::-1], perm[target])
    back_img, back_tgt = aug.flip_lr(fimg, ftgt, perm, n_mr=1)
    assert np.array_equal(back_tgt, target) and np.allclose(back_img, image)
    # hemisphere stage: left and right swap
    himg, htgt, hlabels = tr.stage_arrays(s, 'hemisphere', ['T1w', 'prior'], LABELS, factor=2)
    assert himg.shape == (3, 12, 10, 8) and set(np.unique(htgt)) == {0, 1, 2}
    assert lab.swap_classes(hlabels).tolist() == [0, 2, 1]


def test_sample_patch_pads_small_volumes():
    rng = np.random.default_rng(1)
    image = np.ones((2, 5, 6, 7), np.float32)
    target = np.ones((5, 6, 7), np.uint8)
    img, tgt = tr.sample_patch(image, target, (8, 8, 8), rng)
    assert img.shape == (2, 8, 8, 8) and tgt.shape == (8, 8, 8)
    assert img.sum() == 2 * 5 * 6 * 7 and tgt.sum() == 5 * 6 * 7


def _tiny_train(state=None, epochs=2, seed=0):
    rng = np.random.default_rng(0)
    subjects = [_toy_subject(rng, name=f's{i}') for i in range(2)]
    pairs = [tr.stage_arrays(s, 'lobules', ['T1w'], LABELS)[:2] for s in subjects]
    torch.manual_seed(0)
    model = seg.build_model('dpn', 1, 6, features=[8, 8])
    if state is not None and 'weights' in state:
        model.load_state_dict(state.pop('weights'))
        state = tr.TrainState(**state)
    out = tr.train_segmentation(model, pairs[:1], pairs[1:], labels=LABELS, n_mr=1,
                                epochs=epochs, steps_per_epoch=6, patch=16, batch=2, lr=1e-2,
                                seed=seed, state=state,
                                augment=aug.Augment.patches(elastic=0.5, spacing=2.0))
    return model, out


def test_training_learns_and_resumes_exactly():
    torch.set_num_threads(1)
    model, state = _tiny_train(epochs=4)
    hist = state.history
    assert len(hist) == 4 and hist[-1]['loss'] < hist[0]['loss']
    assert hist[-1]['validation_dice'] > hist[0]['validation_dice']
    # 2 epochs, "interrupt", 2 more from the saved state == 4 in one go
    model2, half = _tiny_train(epochs=2)
    saved = {**half.__dict__, 'weights': model2.state_dict()}
    model3, resumed = _tiny_train(state=saved, epochs=4)
    assert [h['loss'] for h in resumed.history] == pytest.approx([h['loss'] for h in hist])
    for a, b in zip(model.state_dict().values(), model3.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def _stage_model(tmp_path, stage, labels, inputs, arch, spacing, seed, name):
    torch.manual_seed(seed)
    n_prior = len(labels) - 1 if 'prior' in inputs else 0
    model = seg.build_model(arch, seg.n_input_channels(inputs, n_prior), len(labels),
                            features=[4, 4])
    path = cpt.save_cascade_net(tmp_path / name, model, architecture=arch, inputs=inputs,
                               stage=stage, labels=labels, spacing=spacing, protocol='suit')
    return path


def test_cascade_ensemble_and_uncertainty(tmp_path):
    rng = np.random.default_rng(0)
    s = _toy_subject(rng, shape=(32, 24, 20))
    inputs = ['T1w', 'prior']
    hemi = [_stage_model(tmp_path, 'hemisphere', lab.HEMISPHERE_LABELS, inputs, 'dpn', 1.0, 0,
                         'h.pt')]
    lob = [_stage_model(tmp_path, 'lobules', LABELS, inputs, a, 0.5, i, f'l{a}.pt')
           for i, a in enumerate(['unet', 'dpn'])]
    hm = cascade.load_models(hemi, inputs=inputs, stage='hemisphere', protocol='suit')
    lm = cascade.load_models(lob, inputs=inputs, stage='lobules', protocol='suit')
    res = cascade.run_cascade(s.t1, labels=LABELS, x_mm=s.x_mm, hemisphere_models=hm,
                              lobule_models=lm, prior=s.prior, roi=16, roi_margin_mm=2,
                              mask_margin_mm=1)
    assert res.classes.shape == s.t1.shape and res.probseg.shape == s.t1.shape + (6,)
    sums = res.probseg.astype(int).sum(-1)
    assert np.all(np.abs(sums - 255) <= 6)
    assert res.disagreement.min() >= 0 and res.disagreement.max() <= 1
    assert res.disagreement.max() > 0  # two different random nets disagree
    # the lobule net only labels voxels inside the (dilated) hemisphere mask
    outside = ~np.isin(res.classes, [0]) & (res.hemisphere == 0)
    assert outside.sum() <= (res.hemisphere > 0).sum()
    unc = res.label_uncertainty()
    assert unc.shape == (6,)
    assert res.members is None
    with_members = cascade.run_cascade(s.t1, labels=LABELS, x_mm=s.x_mm, hemisphere_models=hm,
                                       lobule_models=lm, prior=s.prior, roi=16, roi_margin_mm=2,
                                       mask_margin_mm=1, members=True)
    assert len(with_members.members) == 2
    assert np.array_equal(with_members.classes, res.classes)
    assert all(m.shape == s.t1.shape for m in with_members.members)
    # one network: no disagreement
    one = cascade.run_cascade(s.t1, labels=LABELS, x_mm=s.x_mm, hemisphere_models=hm,
                              lobule_models=lm[:1], prior=s.prior, roi=16)
    assert one.disagreement.max() == 0
    with pytest.raises(cpt.CheckpointError, match='this run has T1w'):
        cascade.load_models(lob, inputs=['T1w'], stage='lobules', protocol='suit')


def test_outline_role_keeps_the_networks_background_and_the_priors_lobules(tmp_path):
    """role 'outline': p(background) is the networks', the foreground is shared among the
    lobules as the prior shares its own; where the prior has no foreground, as the networks
    do. In the cascade, every voxel keeps the networks' cerebellum-or-not and, inside, takes
    the prior's lobule."""
    net = torch.tensor([[0.9, 0.2, 0.3, 0.1],      # background
                        [0.05, 0.7, 0.1, 0.2],     # lobule A
                        [0.05, 0.1, 0.6, 0.7]])    # lobule B
    prior = np.array([[255, 0, 255, 51],
                      [0, 51, 0, 204],
                      [0, 204, 0, 0]], np.uint8)
    out = cascade.outline_role(net.clone(), prior)
    assert torch.allclose(out.sum(0), torch.ones(4))
    assert torch.allclose(out[0], net[0])
    assert torch.allclose(out[1:, 1], torch.tensor([0.8 * 0.2, 0.8 * 0.8]))   # prior's shares
    assert torch.allclose(out[1:, 2], net[1:, 2])      # no prior foreground: the networks'
    assert torch.allclose(out[1:, 3], torch.tensor([0.9, 0.0]))   # the prior's lobule A
    assert out.argmax(0).tolist() == [0, 2, 2, 1]

    rng = np.random.default_rng(0)
    s = _toy_subject(rng, shape=(32, 24, 20))
    inputs = ['T1w', 'prior']
    hemi = [_stage_model(tmp_path, 'hemisphere', lab.HEMISPHERE_LABELS, inputs, 'dpn', 1.0, 0,
                         'h.pt')]
    lob = [_stage_model(tmp_path, 'lobules', LABELS, inputs, 'unet', 0.5, 3, 'l.pt')]
    hm = cascade.load_models(hemi, inputs=inputs, stage='hemisphere', protocol='suit')
    lm = cascade.load_models(lob, inputs=inputs, stage='lobules', protocol='suit')
    kw = dict(labels=LABELS, x_mm=s.x_mm, hemisphere_models=hm, lobule_models=lm,
              prior=s.prior, roi=16, roi_margin_mm=2, mask_margin_mm=1)
    labels = cascade.run_cascade(s.t1, **kw)
    outline = cascade.run_cascade(s.t1, role='outline', **kw)
    assert np.array_equal(outline.probseg[..., 0], labels.probseg[..., 0])
    inside = (outline.classes > 0) & (s.prior[1:].sum(0) > 0)
    assert inside.any()
    assert np.array_equal(outline.classes[inside], s.prior[1:].argmax(0)[inside] + 1)
    with pytest.raises(ValueError, match='pass the prior'):
        cascade.run_cascade(s.t1, role='outline', **{**kw, 'prior': None})
    with pytest.raises(ValueError, match='unknown role'):
        cascade.run_cascade(s.t1, role='lobules', **kw)


def test_cascade_refuses_networks_of_another_label_table(tmp_path):
    """Lobule networks trained on another lookup table than the run's: exit 126 (a weights
    problem), naming the networks, the lookup table and the fix (was a plain ValueError:
    exit 70, no fix)."""
    import nibabel as nib

    from cerebseg.interfaces.segmentation import DeepCeresCascade

    inputs = ['T1w']
    hemi = _stage_model(tmp_path, 'hemisphere', lab.HEMISPHERE_LABELS, inputs, 'dpn', 1.0, 0,
                        'h.pt')
    lob = _stage_model(tmp_path, 'lobules', LABELS, inputs, 'dpn', 0.5, 1, 'lobules.pt')
    lut = tmp_path / 'other_dseg.tsv'
    lut.write_text('index\tname\n' + ''.join(f'{i}\t{n}\n' for i, n in LABELS[:-1])
                   + '5\tRight_C\n')
    t1 = tmp_path / 't1_box.nii.gz'
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.diag([.5, .5, .5, 1])), t1)
    node = DeepCeresCascade(t1_box=str(t1), hemisphere_weights=[str(hemi)],
                            hemisphere_inputs=inputs, lobule_weights=[str(lob)],
                            lobule_inputs=inputs, lut=str(lut), protocol='suit')
    with pytest.raises(cpt.CheckpointError, match=r'lobules\.pt were trained on another label '
                       r'table than the lookup table of the run \(.*other_dseg\.tsv\).*'
                       r'--cnn-weights') as err:
        node.run(cwd=str(tmp_path))
    assert err.value.exit_code == 126
    # the same networks with their own table pass the check
    assert cascade.load_models([lob], inputs=inputs, stage='lobules', protocol='suit',
                               labels=LABELS)


def test_ensemble_distance():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 0.5], [1.0, 0.5]])
    want = torch.stack([a, b]).mean(0)
    mean, dis = cascade.ensemble([a.clone(), b])
    assert torch.equal(mean, want)   # accumulated in place, the same numbers
    assert torch.allclose(dis, torch.tensor([1.0, 0.5]))
    unc = cascade.label_uncertainty(np.array([0, 1]), dis.numpy(), 3)
    assert unc[0] == 1.0 and unc[1] == 0.5 and np.isnan(unc[2])


@pytest.mark.parametrize('arch', ['unet', 'dpn'])
def test_transfer_weights_adds_a_zero_t2w_channel(tmp_path, arch):
    torch.manual_seed(0)
    old = seg.build_model(arch, 1 + 5, 6, features=[4, 4, 4])
    path = cpt.save_cascade_net(tmp_path / 'o.pt', old, architecture=arch,
                               inputs=['T1w', 'prior'], stage='lobules', labels=LABELS,
                               spacing=0.5, protocol='suit')
    new = seg.build_model(arch, 2 + 5, 6, features=[4, 4, 4])
    adapted = tr.transfer_weights(cpt.read_cascade_checkpoint(path), new, ['T1w', 'T2w', 'prior'], 5)
    assert adapted
    x = torch.randn(1, 6, 8, 8, 8)
    x2 = torch.cat([x[:, :1], 5 * torch.randn(1, 1, 8, 8, 8), x[:, 1:]], 1)
    old.eval(), new.eval()
    with torch.no_grad():  # the T2w channel changes nothing until it is trained
        assert torch.allclose(old(x), new(x2), atol=1e-5)


@pytest.mark.parametrize('arch', ['unet', 'dpn'])
def test_prior_residual_starts_at_the_prior(arch):
    torch.manual_seed(0)
    model = seg.build_model(arch, 1 + 5, 6, features=[4, 4], prior_channels=5).eval()
    probs = torch.distributions.Dirichlet(torch.ones(6)).sample((8, 8, 8)).permute(3, 0, 1, 2)
    x = torch.cat([torch.randn(1, 1, 8, 8, 8), probs[None, 1:]], 1)
    with torch.no_grad():
        out = torch.softmax(model(x), 1)[0]
    assert torch.allclose(out, probs, atol=0.01)
    with pytest.raises(ValueError, match='cannot be added'):
        seg.build_model(arch, 6, 6, prior_channels=4)


@pytest.mark.parametrize('arch', ['unet', 'dpn'])
def test_lean_inference_gives_the_same_probabilities(arch, monkeypatch):
    """Inference with the full-resolution convolutions slab by slab, the prior residual and
    the softmax in place (what keeps a 0.5 mm lobule box under 4 GB) gives the probabilities
    of the plain forward pass to float rounding, and the same labels."""
    from cerebseg.models.inference import predict

    torch.manual_seed(0)
    model = seg.build_model(arch, 2 + 4, 5, features=[4, 6, 8], prior_channels=4).eval()
    for param in model.parameters():
        param.data.normal_(0, 0.3)
    image = np.random.default_rng(0).random((6, 36, 24, 20)).astype(np.float32)
    image[2:] /= 4
    monkeypatch.setattr(seg, 'LEAN', False)
    with torch.no_grad():
        plain = torch.softmax(model(torch.as_tensor(image)[None]), 1)[0]
    monkeypatch.setattr(seg, 'LEAN', True)
    monkeypatch.setattr(seg, 'LEAN_MIN_VOXELS', 100)
    monkeypatch.setattr(seg, 'SLAB', 5)
    lean = predict(model, image, roi=256)
    assert lean.shape == (5, 36, 24, 20)
    assert torch.allclose(lean, plain, atol=1e-6)
    assert torch.equal(lean.argmax(0), plain.argmax(0))


def test_prepared_training_data_keeps_each_cases_own_prior(tmp_path, monkeypatch):
    """The cached training data record which library entries made the prior: another library
    prepares it again, unless ``prepared`` (each case's own leave-one-out library, prepared one
    by one, then trained on together); ``prepared`` without cached data is an error."""
    from types import SimpleNamespace

    from cerebseg.errors import BadDataError
    from cerebseg.training import data

    label_file = tmp_path / 'sub-a_dseg.nii.gz'
    label_file.write_bytes(b'labels')
    run = SimpleNamespace(label='sub-a', t1w='/x/sub-a_T1w.nii.gz', t2w=None)
    own = {'name': 'cobra', 'entry_info': [{'name': 'MNI'}, {'name': 'brain3'}]}
    other = {'name': 'cobra', 'entry_info': [{'name': 'MNI'}, {'name': 'brain2'}]}
    with pytest.raises(BadDataError, match='No prepared training data for sub-a'):
        data.prepare_subject(run, label_file, None, own, tmp_path, prepared=True)
    key = (f'{data.CACHE_VERSION}|2|{label_file.resolve()}|{label_file.stat().st_mtime_ns}|'
           f'{run.t1w}|{run.t2w}|MNI,brain3')           # 2: cobra's registration control grid
    cache = tmp_path / 'segmentation_data' / 'sub-a_cobra_search1.npz'
    cache.parent.mkdir()
    t1 = np.ones((4, 4, 4), np.float32)
    np.savez(cache, key=key, t1=t1, classes=np.zeros((4, 4, 4), np.uint8),
             x_mm=np.arange(4.0), t2=np.zeros(0, np.float32),
             prior=np.zeros((2, 4, 4, 4), np.uint8))
    for library, prepared in ((own, False), (other, True)):
        got = data.prepare_subject(run, label_file, None, library, tmp_path,
                                   prior={'search': 1}, prepared=prepared)
        assert got.name == 'sub-a' and got.t2 is None and np.array_equal(got.t1, t1)
    with pytest.raises(BadDataError, match='No prepared'):   # another fusion: other data
        data.prepare_subject(run, label_file, None, other, tmp_path, prepared=True)
    def computed(*args):
        raise RuntimeError('prior computed')

    monkeypatch.setattr(data, '_prior_outputs', computed)
    with pytest.raises(RuntimeError, match='prior computed'):   # another library: again
        data.prepare_subject(run, label_file, None, other, tmp_path, prior={'search': 1})


def test_training_cache_names_the_priors_settings():
    """One training cache per prior setting: local voting keeps the old name; cobra's default
    (mixed fusion, levels matched, borders on the branches with votes) has its own."""
    from types import SimpleNamespace

    from cerebseg.bids_app.metadata import fusion_settings, lobule_branches
    from cerebseg.training.data import LOCAL_PRIOR, prior_tag

    assert prior_tag(None) == prior_tag(LOCAL_PRIOR) == ''
    assert prior_tag({'search': 1}) == '_search1'
    cobra = {'name': 'cobra', 'votes': {'entries': [], 'n_labels': 11, 'weight': 0.5}}
    opts = SimpleNamespace(fusion_search='auto', fusion_nonlocal_weight='auto',
                           lobule_borders='auto', lobule_votes='auto')
    prior = {**fusion_settings(opts, cobra), 'branches': lobule_branches(opts, cobra)}
    assert prior_tag(prior) == '_search1w0.5_levels_branches-votes'
    opts.lobule_votes, opts.fusion_search = 'off', '0'
    prior = {**fusion_settings(opts, cobra), 'branches': lobule_branches(opts, cobra)}
    assert prior_tag(prior) == '_levels_branches'


def test_simulated_prior_is_the_labels_moved_and_blurred():
    """The simulated prior: probabilities of the foreground classes, close to the labels (a
    few mm off at most, blurred), different for each draw; a patch's prior channels are
    replaced only at the probability asked for."""
    from cerebseg.training.augment import Augment, augment_patch, simulate_prior
    from cerebseg.utils.evaluation import dice_per_label

    target = np.zeros((40, 40, 40), np.uint8)
    target[8:32, 8:20, 8:32] = 1
    target[8:32, 20:32, 8:32] = 2
    aug = Augment.patches(simulated_prior=1.0, prior_mm=(2.0, 2.0))
    rng = np.random.default_rng(0)
    a, b = (simulate_prior(target, 3, rng, aug) for _ in range(2))
    assert a.shape == (2, 40, 40, 40) and a.min() >= 0 and a.sum(0).max() <= 1 + 1e-5
    assert not np.allclose(a, b)
    labels = np.where(a.max(0) > 1 - a.sum(0), a.argmax(0) + 1, 0)
    dice = dice_per_label(labels, target, [1, 2])
    assert min(dice) > 0.8 and max(dice) < 0.999, dice
    image = np.concatenate([np.random.default_rng(1).random((1, 40, 40, 40), np.float32),
                            np.zeros((2, 40, 40, 40), np.float32)])
    perm = np.array([0, 1, 2])
    out, _ = augment_patch(image, target, rng, dataclasses.replace(aug, flip=0, elastic=0),
                           perm, 1)
    assert out[1:].sum() > 0, 'the prior channels were replaced'
    out, _ = augment_patch(image, target, rng, Augment.patches(flip=0, elastic=0), perm, 1)
    assert out[1:].sum() == 0, 'the default keeps the computed prior'
