import pytest
import torch
from pydoc_data.topics import topics

from flashllm.data import HELD_OUT_SHARE, calibration_data, default_text


class PositionTokenizer:
    """Token id = character position, so every window shows exactly where in the text it came from."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": list(range(len(text)))}


def test_splits_hold_whole_topics_apart():
    calibration, evaluation = default_text("calibration"), default_text("evaluation")
    share = len(evaluation) / (len(calibration) + len(evaluation))
    assert abs(share - HELD_OUT_SHARE) < 0.02
    held_out = [text for text in topics.values() if text in evaluation]
    assert held_out and all(text not in calibration for text in held_out)
    assert all(text in calibration or text in evaluation for text in topics.values())
    assert default_text() == calibration


def test_unknown_split():
    with pytest.raises(ValueError, match="'test'"):
        default_text("test")


def test_windows_are_non_overlapping_and_seeded():
    text = "x" * 10_000
    seed = int(torch.randint(0, 2**31, ()))
    ids = calibration_data(PositionTokenizer(), nsamples=12, seqlen=300, seed=seed, text=text)
    assert ids.shape == (12, 300) and ids.dtype == torch.long
    assert (ids[:, 1:] - ids[:, :-1] == 1).all()  # each window is contiguous text
    starts = ids[:, 0].sort().values
    assert (starts[1:] - starts[:-1] >= 300).all() and int(ids.max()) < len(text)
    assert torch.equal(ids, calibration_data(PositionTokenizer(), 12, 300, seed=seed, text=text))
    assert not torch.equal(ids, calibration_data(PositionTokenizer(), 12, 300, seed=seed + 1, text=text))


def test_every_window_fits_exactly():
    ids = calibration_data(PositionTokenizer(), nsamples=4, seqlen=25, text="y" * 100)
    assert sorted(ids[:, 0].tolist()) == [0, 25, 50, 75]


def test_default_text_is_the_calibration_split():
    ids = calibration_data(PositionTokenizer(), nsamples=8, seqlen=1000)
    assert int(ids.max()) < len(default_text("calibration"))


def test_text_too_short_for_the_request():
    with pytest.raises(ValueError, match=r"1,000 tokens, room for 3 non-overlapping windows of 300.*4 were requested"):
        calibration_data(PositionTokenizer(), nsamples=4, seqlen=300, text="z" * 1000)


@pytest.mark.parametrize("nsamples, seqlen", [(0, 10), (2, 0), (2.5, 10), (True, 10)])
def test_bad_sizes(nsamples, seqlen):
    with pytest.raises(ValueError, match="positive integer"):
        calibration_data(PositionTokenizer(), nsamples=nsamples, seqlen=seqlen, text="w" * 100)
