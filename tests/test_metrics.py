import torch

from alexnet.metrics import MetricsWriter, Tally, read_metrics, topk_correct
from pipelines.base import PAD_LABEL


def test_topk_counts_skip_padding_rows():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: 5th best -> top-5 hit only
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: worst -> miss
            [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # padding row: never counted
        ]
    )
    labels = torch.tensor([0, 1, 5, PAD_LABEL])
    assert topk_correct(logits, labels).tolist() == [1, 2]


def test_tally_gives_exact_ratios_not_mean_of_means():
    tally = Tally(torch.device("cpu"))
    tally.add(torch.tensor(3.0), torch.tensor([3, 3]), 3)  # a full "rank": 3/3 right
    tally.add(torch.tensor(1.0), torch.tensor([0, 1]), 1)  # a short one: 0/1 right
    stats = tally.reduce()
    assert stats["count"] == 4 and stats["top1"] == 75.0 and stats["top5"] == 100.0  # not (100 + 0) / 2
    assert stats["loss"] == 1.0


def test_metrics_writer_appends_json_lines(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write({"split": "train", "epoch": 1, "step": 10, "loss": 2.0, "top1": 5.0})
    writer.write({"split": "val", "epoch": 1, "step": 10, "loss": 1.5, "top1": 9.0})
    writer.close()
    assert [r["split"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["train", "val"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
