"""The loss mask of chat data: stored beside the ids, applied to the targets of training
batches and evaluation windows, and so to the gradients (not only the loss)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt_runtime.data import BatchSampler, DataDir, sequential_windows
from gpt_runtime.data_writer import SplitWriter, write_data_dir
from gpt_runtime.errors import QuillError
from gpt_runtime.evaluate import evaluate_tokens
from gpt_runtime.model import GPT, GPTConfig
from plugins.char_tokenizer import CharTokenizer

TOK = CharTokenizer(list("abcdefgh"))


def masked_dir(tmp_path: Path, ids: list[int], mask: list[bool]) -> DataDir:
    splits = [SplitWriter(tmp_path, "train", TOK.vocab_size, masked=True), SplitWriter(tmp_path, "val", TOK.vocab_size, masked=True)]
    splits[0].write(ids, mask)
    splits[1].write(ids[:20], mask[:20])
    write_data_dir(tmp_path, splits, TOK, {"corpus": "test"})
    return DataDir.open(tmp_path)


def pattern(n: int) -> tuple[list[int], list[bool]]:
    """Ids 4..11 over and over; the mask is True on every third token."""
    ids = [4 + i % 8 for i in range(n)]
    return ids, [i % 3 == 0 for i in range(n)]


def test_the_mask_is_stored_beside_the_ids_and_read_back(tmp_path):
    ids, mask = pattern(100)
    data = masked_dir(tmp_path, ids, mask)
    assert data.meta["mask"] is True
    assert data.tokens("train").tolist() == ids
    assert data.mask("train").tolist() == mask
    assert data.mask("val").tolist() == mask[:20]


def test_plain_text_has_no_mask_and_a_damaged_mask_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    plain = [SplitWriter(tmp_path / "plain", name, TOK.vocab_size) for name in ("train", "val")]
    plain[0].write([4, 5, 6])
    assert write_data_dir(tmp_path / "plain", plain, TOK, {})["mask"] is False
    assert DataDir.open(tmp_path / "plain").mask("train") is None
    with pytest.raises(ValueError):  # a masked split needs a mask for every write
        SplitWriter(tmp_path, "x", TOK.vocab_size, masked=True).write([4, 5])
    data = masked_dir(tmp_path, *pattern(50))
    (data.path / "train.mask").write_bytes(b"\x01" * 10)
    with pytest.raises(QuillError, match="one byte per token"):
        data.mask("train")


def test_batches_ignore_the_targets_the_mask_leaves_out():
    positions = torch.arange(400)  # each token is its own position, so a target says where it came from
    mask = positions % 3 == 0
    sampler = BatchSampler(positions, 16, 8, seed=0, mask=mask)
    plain = BatchSampler(positions, 16, 8, seed=0)
    for _ in range(5):
        (x, y), (px, py) = sampler.next(), plain.next()
        assert torch.equal(x, px)  # the inputs are whole: the model still reads the user's text
        assert torch.equal(y >= 0, py % 3 == 0)  # a target is kept exactly where the mask marks it
        assert torch.equal(y[y >= 0], py[py % 3 == 0])


def test_evaluation_windows_count_only_masked_tokens(tmp_path):
    ids, mask = pattern(70)
    tokens, m = torch.tensor(ids), torch.tensor(mask)
    targets = torch.cat([y[y >= 0] for _, y in sequential_windows(tokens, 8, 3, m)])
    expected = [t for t, keep in zip(ids[1:], mask[1:]) if keep]
    assert targets.tolist() == expected
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))
    assert evaluate_tokens(model, tokens, TOK, 3, mask=m).tokens == len(expected)
    assert evaluate_tokens(model, tokens, TOK, 3).tokens == len(ids) - 1


def test_masked_positions_contribute_no_gradient():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=12, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(4, 12, (2, 12))
    y = torch.randint(4, 12, (2, 12))
    keep = torch.zeros(2, 12, dtype=torch.bool)
    keep[:, 6:] = True  # the "model's turn": the second half

    def grads(targets: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        _, loss = model(x, targets)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    masked = y.masked_fill(~keep, -1)
    base = grads(masked)
    # Any other targets at the masked positions give exactly the same gradients...
    other = torch.where(keep, y, (y + 3 - 4) % 8 + 4)
    assert all(torch.equal(a, b) for a, b in zip(base, grads(other.masked_fill(~keep, -1))))
    # ...while the same change with the mask off changes them: the positions would count.
    assert not all(torch.allclose(a, b) for a, b in zip(grads(y), grads(other)))
    # And the logits' gradient is zero at every masked position.
    logits, _ = model(x)
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), masked.view(-1), ignore_index=-1)
    _, model_loss = model(x, masked)
    assert torch.allclose(loss, model_loss, atol=1e-6)
    loss.backward()
    assert torch.count_nonzero(logits.grad[~keep]) == 0
    assert torch.count_nonzero(logits.grad[keep]) > 0


def test_a_window_with_every_target_masked_has_loss_zero_not_nan():
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))
    _, loss = model(torch.randint(4, 12, (2, 8)), torch.full((2, 8), -1))
    assert loss.item() == 0.0


def test_validation_loss_is_weighted_by_the_targets_each_batch_counts():
    from gpt_runtime.train import estimate_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16))
    positions = torch.arange(4, 12).repeat(40)
    mask = torch.zeros(len(positions), dtype=torch.bool)
    mask[::7] = True  # few targets count: many windows have one or none

    def batches():
        return BatchSampler(positions, 8, 2, seed=3, mask=mask)

    sampler, total, counted = batches(), 0.0, 0
    for _ in range(6):
        x, y = sampler.next()
        logits, _ = model(x)
        keep = y >= 0
        total += torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum").item()
        counted += int(keep.sum())
    expected = total / counted
    got = estimate_loss(model, batches(), 6, torch.autocast("cpu", enabled=False), 1, torch.device("cpu"))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.cuda
def test_masked_data_trains_and_fine_tunes_on_cuda(tmp_path):
    import math

    from gpt_runtime.config import TrainConfig
    from gpt_runtime.init_from import take_source_shape
    from gpt_runtime.train import train

    ids, mask = pattern(3000)
    masked_dir(tmp_path, ids, mask)
    common = dict(data=str(tmp_path), batch_size=4, max_steps=4, warmup_steps=1, eval_interval=2, eval_steps=2,
                  log_interval=1, device="cuda", dtype="float32")
    base = train(TrainConfig(out=str(tmp_path / "base"), n_layer=1, n_head=2, n_embd=16, block_size=16, **common))
    assert base.best_val_loss is not None and math.isfinite(base.best_val_loss) and base.best_val_loss > 0
    tuned = train(take_source_shape(TrainConfig(out=str(tmp_path / "tuned"), init_from=str(tmp_path / "base"), **common), set()))
    assert math.isfinite(tuned.best_val_loss) and tuned.best_val_loss > 0
