import pytest
import torch

from models.tiny import FAMILIES, build_processor, build_tokenizer
from videoprefill.tokens import RunCollapsingTokenizer, collapsed_runs


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _call(processor, question: str, frames: int = 8, side: int = 112, **kwargs):
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    metadata = {"fps": 8.0, "frames_indices": list(range(0, 4 * frames, 4)), "total_num_frames": 4 * frames,
                "video_backend": "decord"}
    return processor(text=[prompt], videos=[torch.rand(frames, 3, side, side) * 255], video_metadata=[metadata],
                     do_resize=False, do_sample_frames=False, return_tensors="pt", **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_collapsed_runs_give_the_processors_tokens(tokenizer, family, monkeypatch):
    """The processor's ids, attention mask and token types, with every run of the video placeholder
    tokenized once (checked: the tokenizer saw the collapsed text)."""
    processor = build_processor(family, tokenizer)
    question = "What colour is the square?"
    side = 128 if family == "qwen3-vl" else 112  # a multiple of the patch size times the merge size
    torch.manual_seed(0)
    expected = _call(processor, question, side=side)
    seen = []
    real = type(tokenizer).__call__

    def spy(self, text, **kwargs):
        seen.append(text)
        return real(self, text, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    with collapsed_runs(processor):
        assert isinstance(processor.tokenizer, RunCollapsingTokenizer)
        torch.manual_seed(0)
        got = _call(processor, question, side=side)
    assert processor.tokenizer is tokenizer
    token = processor.video_token
    assert len(seen) == 1 and token * 2 not in seen[0][0] and token in seen[0][0]
    n_video = int((expected["input_ids"] == processor.video_token_id).sum())
    assert n_video >= 16
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_other_arguments_tokenize_as_the_processor_does(tokenizer):
    wrapped = RunCollapsingTokenizer(tokenizer, "<|video_pad|>")
    text = "a <|video_pad|><|video_pad|><|video_pad|> b"
    for kwargs in ({"truncation": True, "max_length": 3}, {"return_offsets_mapping": True}, {"padding": "max_length",
                                                                                              "max_length": 12}):
        assert wrapped(text, **kwargs) == tokenizer(text, **kwargs)
    plain = wrapped(text)
    assert plain["input_ids"] == tokenizer(text)["input_ids"]
    assert plain["input_ids"].count(tokenizer.convert_tokens_to_ids("<|video_pad|>")) == 3
    assert wrapped.convert_tokens_to_ids("<|video_pad|>") == tokenizer.convert_tokens_to_ids("<|video_pad|>")


def test_nothing_changes_without_an_added_video_token(tokenizer):
    class NoVideo:
        pass

    processor = NoVideo()
    processor.tokenizer = tokenizer
    with collapsed_runs(processor):
        assert processor.tokenizer is tokenizer
