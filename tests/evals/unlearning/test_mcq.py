"""Tests for mtsae.evals.unlearning.mcq: prompt text, letter tokens, scoring, permutations, filtering, loading."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mtsae.evals.unlearning.mcq import (
    MCQDatasetError,
    MCQuestion,
    accuracy,
    answer_probs,
    filter_correct,
    format_question,
    letter_token_ids,
    load_mcq,
    permutations_of,
    predict,
    score_mcq,
    special_token_ids,
    subject_of,
)

# Gemma's chat template, reduced to what a user turn needs (same output as the real one)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' "
    "+ message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
WORDS = [
    "A",
    "B",
    "C",
    "D",
    " A",
    " B",
    " C",
    " D",
    "\n",
    ".",
    ":",
    " (",
    "(",
    "Answer",
    " right",
    " wrong",
    " other",
    " third",
    "user",
    "model",
    "What",
    " is",
    " it",
    "?",
    "The",
    " following",
]


def tiny_tokenizer(chat: bool = True):
    """Word-level tokenizer: ``"A"`` and ``" A"`` are single tokens, BOS is prepended."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\w+| ?[^\w\s]|\n| "), behavior="isolated")
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat:
        fast.chat_template = GEMMA_TEMPLATE
    return fast


# ---------------------------------------------------------------------------------------------- prompt text
BODY = (
    "The following are multiple choice questions (with answers) about biology.\n"
    "What is it?\nA. a\nB. b\nC. c\nD. d"
)


def test_format_question_exact_text() -> None:
    assert format_question("What is it?", ["a", "b", "c", "d"]) == BODY + "\nAnswer:"
    # instruct model: SAEBench's GEMMA_INST_FORMAT + "Answer: ("
    expected = "<bos><start_of_turn>user\n" + BODY + "<end_of_turn>\n<start_of_turn>model\nAnswer: ("
    assert (
        format_question("What is it?", ["a", "b", "c", "d"], chat_template_tokenizer=tiny_tokenizer())
        == expected
    )
    text = format_question("Q", ["x", "y"], letters="AB", subject=subject_of("high_school_us_history"))
    assert text == (
        "The following are multiple choice questions (with answers) about high school us history.\n"
        "Q\nA. x\nB. y\nAnswer:"
    )
    assert subject_of("wmdp-bio") == "biology"
    with pytest.raises(ValueError, match="letters"):
        format_question("Q", ["a", "b", "c"], letters="AB")


def test_letter_token_ids() -> None:
    tok = tiny_tokenizer()
    ids = letter_token_ids(tok, "ABCD")
    assert ids.shape == (4, 2)
    assert tok.convert_ids_to_tokens(ids[:, 0].tolist()) == ["A", "B", "C", "D"]
    assert tok.convert_ids_to_tokens(ids[:, 1].tolist()) == [" A", " B", " C", " D"]
    with pytest.raises(ValueError, match="not a single token"):
        letter_token_ids(tok, ["A."])
    assert special_token_ids(tok) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- scoring
def test_answer_probs_max_over_space_variants() -> None:
    letter_ids = torch.tensor([[0, 4], [1, 5], [2, 6], [3, 7]])  # "A".."D", " A".." D"
    p = torch.zeros(3, 10)
    p[0, [0, 4, 5]] = torch.tensor([0.30, 0.30, 0.35])  # max picks B (sum over variants would pick A)
    p[1, [2, 5]] = torch.tensor([0.5, 0.2])  # no-space "C" wins
    p[2, [7, 3]] = torch.tensor([0.6, 0.1])  # " D" wins
    p = p + 0.005  # leave some mass everywhere
    p = p / p.sum(-1, keepdim=True)
    probs = answer_probs(p.log(), letter_ids)  # softmax of log p == p
    expected = torch.stack([torch.maximum(p[:, i], p[:, i + 4]) for i in range(4)], dim=1)
    torch.testing.assert_close(probs, expected)
    assert predict(probs).tolist() == [1, 2, 3]
    assert accuracy(predict(probs) == torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)


def test_permutations_track_answer() -> None:
    choices = ["w", "x", "y", "z"]
    perms = permutations_of(choices, 2)
    assert len(perms) == 24 and len({tuple(c) for c, _ in perms}) == 24
    assert perms[0] == (choices, 2)  # the original order first
    assert all(c[a] == "y" for c, a in perms)
    assert sorted(a for _, a in perms) == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6
    assert permutations_of(choices, 2, all_perms=False) == [(choices, 2)]
    with pytest.raises(ValueError):
        permutations_of(choices, 4)


class RightPicker(nn.Module):
    """Fake LM: answers the letter shown before the option ``" right"``, else "A" (a position bias)."""

    def __init__(self, tok) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.right = tok.convert_tokens_to_ids(" right")
        self.letters = letter_token_ids(tok, "ABCD")
        self.vocab = len(tok)
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for b, row in enumerate(input_ids):
            pos = (row == self.right).nonzero().flatten()
            letter = 0
            if len(pos):
                letter = self.letters[:, 0].tolist().index(int(row[pos[0] - 2]))  # "\n" "A" "." " right"
            logits[b, -1, self.letters[letter, 1]] = 10.0
        return SimpleNamespace(logits=logits)


def _questions() -> list[MCQuestion]:
    return [
        MCQuestion("What is it?", ("wrong", "right", "other", "third"), 1, index=0),  # always right
        MCQuestion("What is it?", ("right", "wrong", "other", "third"), 2, index=1),  # always wrong
        MCQuestion("What is it?", ("wrong", "other", "third", "x"), 0, index=2),  # right iff answer is A
    ]


def test_score_mcq_and_filter_with_fake_model() -> None:
    tok = tiny_tokenizer()
    model = RightPicker(tok)
    entered = []

    @contextlib.contextmanager
    def ctx(ids, mask):
        entered.append(ids.shape[0])
        yield

    scores = score_mcq(model, tok, _questions(), batch_size=2, intervention=lambda ids, mask: ctx(ids, mask))
    assert scores.correct.tolist() == [True, False, True]
    assert scores.answers.tolist() == [1, 2, 0]
    assert scores.probs.shape == (3, 4)
    assert sorted(entered) == [1, 2]  # one context per batch

    assert [q.index for q in filter_correct(model, tok, _questions(), all_perms=False)] == [0, 2]
    kept = filter_correct(model, tok, _questions(), all_perms=True, batch_size=16)
    assert [q.index for q in kept] == [0]
    assert kept[0] == _questions()[0]  # original order of choices is returned
    with pytest.raises(ValueError, match="choices"):
        score_mcq(model, tok, [MCQuestion("Q", ("a", "b"), 0)])


def _tiny_lm(arch: str, vocab: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch == "gpt2":  # absolute positions: left padding is only harmless with position ids from the mask
        cfg = GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.5
        )
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_score_mcq_left_padding_matches_single_forward(arch: str) -> None:
    tok = tiny_tokenizer()
    model = _tiny_lm(arch, len(tok))
    qs = [
        MCQuestion("What is it?", ("a", "b", "c", "d"), 0),
        MCQuestion("What is it ? it is it is it ?", ("right", "b", "other", "third"), 2),
        MCQuestion("?", ("a", "wrong", "c", "d"), 3),
    ]
    for chat in (True, False):
        one = score_mcq(model, tok, qs, batch_size=1, chat_template=chat)
        three = score_mcq(model, tok, qs, batch_size=3, chat_template=chat)
        torch.testing.assert_close(one.probs, three.probs, rtol=1e-4, atol=1e-6)
        # reference: a plain forward of the shortest (most padded) prompt, unpadded
        prompt = format_question(qs[2].question, qs[2].choices, chat_template_tokenizer=tok if chat else None)
        ids = tok(prompt, add_special_tokens=not chat, return_tensors="pt")["input_ids"]
        assert (ids == tok.bos_token_id).sum() == 1
        with torch.no_grad():
            ref = answer_probs(model(input_ids=ids).logits[:, -1], letter_token_ids(tok))
        torch.testing.assert_close(three.probs[2:3], ref, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- loading
ROWS = [
    {"question": "What is it?", "choices": ["a", "b", "c", "d"], "answer": 2},
    {"question": "Which?", "choices": ["w", "x", "y", "z"], "answer": 0},
]


def test_load_mcq_local_files(tmp_path: Path) -> None:
    path = tmp_path / "wmdp_bio.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    qs = load_mcq(path, "wmdp-bio", cache_dir=tmp_path / "cache")
    assert qs == [
        MCQuestion("What is it?", ("a", "b", "c", "d"), 2, "biology", 0),
        MCQuestion("Which?", ("w", "x", "y", "z"), 0, "biology", 1),
    ]
    from datasets import Dataset

    pq = tmp_path / "human_aging.parquet"
    Dataset.from_list(ROWS).to_parquet(str(pq))
    qs = load_mcq(pq, "human_aging", cache_dir=tmp_path / "cache")
    assert [q.subject for q in qs] == ["human aging"] * 2 and qs[1].answer == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q", "choices": ["a"]}) + "\n")
    with pytest.raises(MCQDatasetError, match="missing fields"):
        load_mcq(bad, "wmdp-bio", cache_dir=tmp_path / "cache")
    for row, message in [
        ({"question": "Q", "choices": ["a", "b"], "answer": 5}, "row 0: answer 5 out of range for 2 choices"),
        ({"question": "Q", "choices": "ab", "answer": 0}, "row 0: 'choices' must be a list of strings"),
        ({"question": "Q", "choices": ["a", "b"], "answer": "A"}, "row 0: 'answer' must be an int index"),
        ({"question": 7, "choices": ["a", "b"], "answer": 0}, "row 0: 'question' must be a string"),
    ]:  # a file of the wrong schema is one message (mtsae eval prints it), never a traceback
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(MCQDatasetError, match=message):
            load_mcq(bad, "wmdp-bio", cache_dir=tmp_path / "cache" / message[8:14])
    with pytest.raises(MCQDatasetError, match="does not exist"):
        load_mcq(tmp_path / "nope.jsonl", "wmdp-bio")
    with pytest.raises(ValueError, match="subset"):
        load_mcq(path)


def test_load_mcq_unreachable_hub_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MCQDatasetError) as err:
        load_mcq("cais/wmdp", "wmdp-bio", "test", cache_dir=tmp_path)
    msg = str(err.value)
    assert "cais/wmdp" in msg and "wmdp-bio" in msg and "local copy" in msg and ".jsonl" in msg


def test_unreachable_question_set_names_the_option_to_set(tmp_path, monkeypatch) -> None:
    """Offline, the WMDP question set fails with the option that points it at a local copy."""
    from mtsae.evals.unlearning.config import UnlearningConfig
    from mtsae.evals.unlearning.corpora import load_questions
    from tests.helpers.lm import offline_hub

    offline_hub(monkeypatch)
    with pytest.raises(MCQDatasetError, match="--wmdp-source"):
        load_questions(UnlearningConfig(forget_corpus=str(tmp_path / "forget.jsonl")))
