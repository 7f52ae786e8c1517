"""Ten-crop evaluation (section 4.1): DALI's crops equal a plain-torch ten-crop of the same decoded
images, the loader keeps the val contract, and the softmax is averaged over the crops."""

import math

import numpy as np
import pytest
import torch
from _helpers import dali_missing
from torch.nn import functional as F

from alexnet.engine import build_amp, eval_step
from alexnet.evaluate import eval_batch, predict_log_probs
from alexnet.model import build_model
from pipelines.base import PAD_LABEL, ImageSpec, ShardSpec, val_steps
from pipelines.index import FileIndex, build_file_index

if not dali_missing():  # for the tests marked dali (skipped where DALI is not installed)
    from pipelines.tencrop import TenCropLoader, crop_offsets, ten_crop_graph, ten_crop_reference

CPU = torch.device("cpu")
ON_GPU = pytest.param(
    "mixed", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")]
)
MEAN = (124.0, 116.0, 104.0)
STD = (58.0, 57.0, 57.0)


@pytest.mark.dali
def test_crop_offsets_round_like_dali():
    assert crop_offsets(76, 67) == [(0, 0), (0, 9), (9, 0), (9, 9), (5, 5)]  # 4.5 rounds up
    assert crop_offsets(256, 224) == [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]  # the paper's sizes


@pytest.mark.dali
@pytest.mark.parametrize("decoder", ["cpu", ON_GPU])
@pytest.mark.parametrize("crop,resize", [(67, 76), (64, 75)])
def test_dali_ten_crops_equal_the_torch_reference(tiny_data, crop, resize, decoder):
    """Bit for bit on the CPU: the ten windows, their order, the mirrors and the normalization. On
    the GPU, against the GPU-decoded square, to float rounding: DALI's GPU normalization multiplies
    by 1/std (a last-bit difference), where a wrong window or mirror is off by whole levels."""
    index = build_file_index(tiny_data / "val")
    image = ImageSpec(crop, resize, "paper", MEAN, STD)
    pipe = ten_crop_graph(
        files=index.files[:16],
        labels=index.labels[:16],
        image=image,
        shard=ShardSpec(0, 1, 8, 0),
        decoder=decoder,
        hw_decoder_load=0.65,
        layout="CHW",
        with_square=True,
        batch_size=8,
        num_threads=1,
        device_id=0 if decoder == "mixed" else None,
    )
    pipe.build()
    for _ in range(2):
        crops, _, squares = (out.as_cpu() if hasattr(out, "as_cpu") else out for out in pipe.run())
        crops = torch.from_numpy(np.array(crops.as_tensor()))
        assert crops.shape == (8, 10, 3, crop, crop) and crops.dtype == torch.float32
        for i in range(8):
            square = torch.from_numpy(np.array(squares[i]))
            assert square.shape == (resize, resize, 3)
            reference = ten_crop_reference(square, crop, MEAN, STD)
            if decoder == "cpu":
                assert torch.equal(crops[i], reference)
            else:
                torch.testing.assert_close(crops[i], reference, rtol=0, atol=1e-5)
    # the mirrored half is the first half flipped, and the corners are distinct windows
    assert torch.equal(crops[:, 5:], crops[:, :5].flip(-1))
    assert not torch.equal(crops[:, 0], crops[:, 3])


def numbered(tiny_data, n):
    files = build_file_index(tiny_data / "val").files[:n]
    return FileIndex(files, list(range(n)), [str(i) for i in range(n)])


@pytest.mark.dali
@pytest.mark.parametrize("shards", [1, 2])
def test_loader_counts_every_image_once_with_equal_steps(tiny_data, shards):
    n, batch = 37, 8  # shards of 37 or 18 + 19: padded last batches
    index = numbered(tiny_data, n)
    image = ImageSpec(67, 76, "paper", MEAN, STD)
    seen, steps = [], []
    for rank in range(shards):
        loader = TenCropLoader(index, image, ShardSpec(rank, shards, batch, 0), CPU, 1, 2, "cpu")
        for _ in range(2):  # and the same again next epoch
            batches = list(loader)
            steps.append(len(batches))
            assert all(x.shape == (batch, 10, 3, 67, 67) for x, _ in batches)
            labels = torch.cat([y for _, y in batches])
            seen.append(labels[labels != PAD_LABEL].tolist())
    assert steps == [val_steps(n, shards, batch)] * (2 * shards) == [len(loader)] * (2 * shards)
    assert sorted(sum(seen[::2], [])) == list(range(n))
    assert seen[0] == seen[1]


@pytest.mark.dali
def test_channels_last_loader_gives_the_same_values(tiny_data):
    index = build_file_index(tiny_data / "val")
    image = ImageSpec(67, 76, "paper", MEAN, STD)
    shard = ShardSpec(0, 1, 4, 0)
    plain, _ = next(iter(TenCropLoader(index, image, shard, CPU, 1, 2, "cpu")))
    last, _ = next(iter(TenCropLoader(index, image, shard, CPU, 1, 2, "cpu", channels_last=True)))
    assert torch.equal(plain, last)
    assert last.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.dali
def test_eval_batch_averages_the_softmax_over_the_crops(tiny_data):
    index = build_file_index(tiny_data / "val")
    image = ImageSpec(67, 76, "paper", MEAN, STD)
    images, labels = next(iter(TenCropLoader(index, image, ShardSpec(0, 1, 8, 0), CPU, 1, 2, "cpu")))
    labels[-2:] = PAD_LABEL  # padding rows are not counted
    torch.manual_seed(0)
    model = build_model("paper", 10, 0.5, 67, "kaiming").eval()
    amp = build_amp("off", CPU)
    with torch.no_grad():
        probs = F.softmax(model(images.flatten(0, 1)), dim=1).view(8, 10, 10).mean(dim=1)
        centre = model(images[:, 4])
    result = eval_batch(model, images, labels, amp)
    valid = labels != PAD_LABEL
    expected_loss = -probs[valid].log().gather(1, labels[valid, None]).sum()
    assert int(result.count) == 6
    assert torch.allclose(result.loss_sum, expected_loss, rtol=1e-5)
    top5 = probs[valid].topk(5, dim=1).indices
    assert result.correct.tolist() == [
        int((top5[:, 0] == labels[valid]).sum()),
        int((top5 == labels[valid, None]).any(dim=1).sum()),
    ]
    assert torch.allclose(predict_log_probs(model, images, amp).exp(), probs, atol=1e-6)
    # averaging is not the centre crop alone; 4-D batches are engine.eval_step unchanged
    assert not torch.allclose(probs, F.softmax(centre, dim=1), atol=1e-4)
    plain = eval_batch(model, images[:, 4], labels, amp)
    reference = eval_step(model, images[:, 4], labels, amp)
    assert torch.equal(plain.loss_sum, reference.loss_sum) and torch.equal(plain.correct, reference.correct)


class FixedLogits(torch.nn.Module):
    """A model whose logits for the ten crops of one image are given."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        assert images.shape[0] == len(self.logits)
        return self.logits


def test_ten_crop_scores_stay_exact_far_below_the_best_class():
    """Logits hundreds apart (a diverging model): the averaged softmax of the far classes is below
    float32's range. Formed in log space, the loss and the ranking stay exact; a floor on the
    averaged probabilities capped each image's loss at 87.3 and ranked the floored classes by index."""
    logits = torch.tensor([[0.0, -400.0, -900.0, -300.0, -800.0, -700.0, -600.0]]).repeat(10, 1)
    logits[5:, 0] = -1000.0  # five crops put class 0 far down
    model = FixedLogits(logits)
    images = torch.zeros(1, 10, 3, 4, 4)
    log_probs = predict_log_probs(model, images, build_amp("off", CPU))
    expected = torch.logsumexp(F.log_softmax(logits.double(), dim=1), dim=0) - math.log(10)
    assert torch.allclose(log_probs[0].double(), expected, rtol=1e-6)
    result = eval_batch(model, images, torch.tensor([2]), build_amp("off", CPU))
    assert result.loss_sum.item() == pytest.approx(-expected[2].item(), rel=1e-6) and result.loss_sum.item() > 500
    assert result.correct.tolist() == [0, 0]  # class 2 is the lowest of seven, not tied among the top 5
