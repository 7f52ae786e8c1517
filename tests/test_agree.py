"""The ranks' agreement on each batch (alexnet/parallel/agree.py): a loader's failure on one rank
stops every rank, with the failing rank's error."""

import json

import pytest
from _helpers import REPO, check, launch

from alexnet.parallel.agree import describe_error, fetch_each, shared_fetch_error
from pipelines.index import DataError

DALI_ERROR = (
    "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.resize`,\nwhich was used in the pipeline "
    'definition with the following traceback:\n\n  File "x.py", line 1\n\nencountered:\n\n'
    "std::bad_alloc\nC++ context: [/opt/dali/dali/pipeline/executor.cc:42]\n"
)


def failing_at(i: int, error: Exception):
    yield from range(i)
    raise error


def test_fetch_each_yields_a_loader_s_error_once_and_asks_it_nothing_more():
    """Any exception, not only a bad file's DataError: the caller must agree with the other
    ranks before it raises."""
    fetched = list(fetch_each(failing_at(2, MemoryError("out"))))
    assert [f.batch for f in fetched] == [0, 1, None]
    assert isinstance(fetched[2].error, MemoryError) and fetched[0].error is None


def test_one_process_raises_its_loader_s_own_error():
    error = RuntimeError("DALI failed")
    assert shared_fetch_error(error) is error


def test_an_error_is_described_in_one_line_with_dali_s_cause():
    """DALI's first line says only "Critical error in pipeline:"; the line after "encountered:"
    says what went wrong."""
    assert describe_error(RuntimeError(DALI_ERROR)) == "RuntimeError: Critical error in pipeline: std::bad_alloc"
    assert describe_error(MemoryError()) == "MemoryError"
    assert (
        describe_error(DataError("cannot decode a.jpg\nrun launch/scan.py"))
        == "cannot decode a.jpg\nrun launch/scan.py"
    )


@pytest.fixture(scope="module")
def fetch_agree(tmp_path_factory):
    out = tmp_path_factory.mktemp("fetch_agree")
    proc = check(launch([REPO / "tests" / "dist" / "fetch_agree.py", out], nproc=2, timeout=120))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], proc


def test_a_loader_failing_unforeseen_on_one_rank_stops_both_with_its_message(fetch_agree):
    """Before, the other rank went on into the step's collectives and died there (gloo: a
    connection closed by peer; NCCL: a hang until the timeout). Both ranks stop at the same
    batch with one LoaderError naming rank 1 and its error; rank 1 logs its traceback first."""
    ranks, proc = fetch_agree
    expected = [
        "LoaderError",
        "rank 1 (of 2) could not load its batch: RuntimeError: Critical error in pipeline: "
        "(rank 1 logged its traceback)",
    ]
    assert [r["unforeseen"] for r in ranks] == [{"got": [0, 1], "raised": expected}] * 2
    # Here and in the mixed case; a bad file's DataError says all there is to say.
    assert proc.stderr.count("rank 1: its loader failed; every rank stops\nTraceback (most recent call last)") == 2
    assert "\nRuntimeError: Critical error in pipeline:\nError in thread 0: injected" in proc.stderr


def test_each_rank_with_a_bad_file_names_its_own(fetch_agree):
    ranks, _ = fetch_agree
    assert [r["two_files"]["raised"] for r in ranks] == [
        ["DataError", "cannot decode /data/a.jpg"],
        ["DataError", "cannot decode /data/b.jpg"],
    ]


def test_a_bad_file_and_an_unforeseen_failure_each_raise_their_own(fetch_agree):
    ranks, _ = fetch_agree
    assert [r["mixed"]["raised"] for r in ranks] == [
        ["DataError", "cannot decode /data/a.jpg"],
        [
            "LoaderError",
            "rank 1 (of 2) could not load its batch: MemoryError: std::bad_alloc (rank 1 logged its traceback)",
        ],
    ]
    assert [r["mixed"]["got"] for r in ranks] == [[0, 1], [0, 1]]
