"""A decoder that exists only as code shipped in its checkpoint folder (auto_map), with module names no declared
family uses: normsurgery must trace and prove it at run time (tests/test_traced.py)."""

import math

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class TinyLMConfig(PretrainedConfig):
    model_type = "tinylm_remote"
    attribute_map = {"hidden_size": "width", "num_hidden_layers": "depth"}

    def __init__(self, width=48, depth=3, heads=4, vocab_size=96, eps=1e-5, **kwargs):
        self.width, self.depth, self.heads, self.eps, self.vocab_size = width, depth, heads, eps, vocab_size
        super().__init__(**kwargs)


class Mix(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.heads
        self.wq, self.wk, self.wv = (nn.Linear(c.width, c.width) for _ in range(3))
        self.wo = nn.Linear(c.width, c.width)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        return self.wo((att @ v).transpose(1, 2).reshape(b, t, -1))


class Stage(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pre_mix, self.pre_ff = nn.LayerNorm(c.width, eps=c.eps), nn.LayerNorm(c.width, eps=c.eps)
        self.mix = Mix(c)
        self.grow, self.shrink = nn.Linear(c.width, 2 * c.width), nn.Linear(2 * c.width, c.width)

    def forward(self, x):
        x = x + self.mix(self.pre_mix(x))
        return x + self.shrink(torch.nn.functional.gelu(self.grow(self.pre_ff(x))))


class Trunk(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.width)
        self.stages = nn.ModuleList(Stage(c) for _ in range(c.depth))
        self.out_norm = nn.LayerNorm(c.width, eps=c.eps)

    def forward(self, ids):
        x = self.tok(ids)
        for stage in self.stages:
            x = stage(x)
        return self.out_norm(x)


class TinyLMForCausalLM(PreTrainedModel):
    config_class = TinyLMConfig
    base_model_prefix = "trunk"
    _no_split_modules = ["Stage"]

    def __init__(self, config):
        super().__init__(config)
        self.trunk = Trunk(config)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.trunk.tok

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, **kwargs):
        return CausalLMOutput(logits=self.head(self.trunk(input_ids)))
