"""The CERES-protocol network that ships (issue 22: ``deepceres_cobra.json``, a T1w+T2w U-Net
with the outline role, ``MODEL_CARD_cobra.md``), end to end on the one real T1w+T2w participant
(IXI002): the real command with ``--models unet`` beside the default (the multi-atlas labels,
same work folder). There is no truth for IXI002; what a user relies on is checked: the network
moves the outline only a little and the lobules stay the prior's, and the sidecar says so.
The library is test_real_anatomy's (brain2, brain3 and their mirrors: CI time)."""
import json

import nibabel as nib
import numpy as np
import pytest

DSEG = 'sub-ixi002/anat/sub-ixi002_space-T1w_seg-cerebellum_dseg'


@pytest.mark.integration
@pytest.mark.slow
def test_the_shipped_ceres_network_moves_the_outline_of_a_real_participant(
        shared_data, strict_cobra_assets, tmp_path_factory):
    from cerebseg.bids_app.run import main
    from cerebseg.utils.evaluation import whole_dice

    root = tmp_path_factory.mktemp('ceres-net')
    assets = strict_cobra_assets
    bids = shared_data / 'bids/multimodal'
    common = ['participant', '--participant-label', 'ixi002', '--assets-dir', str(assets),
              '-w', str(root / 'work'), '--skip-bids-validation', '--skip-brainstem',
              '--atlas-library', 'cobra']
    assert main([str(bids), str(root / 'prior'), *common]) == 0
    assert main([str(bids), str(root / 'unet'), *common, '--models', 'unet']) == 0
    prior_img = nib.load(root / 'prior' / f'{DSEG}.nii.gz')
    net_img = nib.load(root / 'unet' / f'{DSEG}.nii.gz')
    assert np.allclose(prior_img.affine, net_img.affine)
    prior, net = np.asarray(prior_img.dataobj), np.asarray(net_img.dataobj)
    change = (net > 0).sum() / (prior > 0).sum() - 1
    both = (prior > 0) & (net > 0)
    same = (prior[both] == net[both]).mean()
    message = (f'cerebellum {100 * change:+.1f} %, whole Dice {whole_dice(net, prior):.3f}, '
               f'same lobule in {100 * same:.1f} % of the voxels both label')
    print(message)   # measured: +1.4 %, 0.986, 99.7 %
    assert 0.002 < abs(change) < 0.03, message     # it moves the outline, a little
    assert whole_dice(net, prior) > 0.97, message
    assert same > 0.97, message                    # the lobules are the prior's
    assert set(np.unique(net)) <= set(np.unique(prior)) | {0}
    sidecar = json.loads((root / 'unet' / f'{DSEG}.json').read_text())
    text = json.dumps(sidecar)
    assert '"Role": "outline"' in text
    assert 'lobules_unet_cobra_T1w-T2w-prior.pt' in text
