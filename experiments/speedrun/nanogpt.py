"""nanoGPT's model, optimizer and training loop in PyTorch eager: the speedrun's reference.

  python -m experiments.speedrun.nanogpt --data_dir=DIR --out=ref.json   # train.bin, val.bin

Written from nanoGPT (Karpathy, github.com/karpathy/nanoGPT: model.py, train.py) as it runs
on a CPU with `--device=cpu --compile=False`, nothing downloaded:

  model      GPT: token + learned position embeddings, pre-LN blocks of LayerNorm (bias
             optional, here off), causal self-attention through one c_attn [D, 3D] and
             F.scaled_dot_product_attention(is_causal=True), an MLP c_fc -> nn.GELU()
             (exact) -> c_proj, final LayerNorm, lm_head tied to wte.
  init       every Linear and Embedding N(0, 0.02), biases 0, each c_proj.weight
             N(0, 0.02 / sqrt(2 n_layer)).
  optimizer  configure_optimizers: AdamW, weight decay on params with >= 2 dims (matrices
             and both embeddings), none on the rest; fused=False off CUDA.
  loop       get_batch (B random offsets into the uint16 memmap, int64 stacks), lr set per
             iteration (linear warmup (it+1)/(warmup+1), cosine to min_lr at lr_decay_iters),
             forward -> loss.backward() -> clip_grad_norm_(1.0) -> optimizer.step() ->
             zero_grad(set_to_none=True), the next batch fetched between forward and
             backward, iterations 0..max_iters inclusive (nanoGPT's `iter_num > max_iters`
             break), float32 (no autocast on CPU), torch's default thread count.

Differences, all outside the timed work: evaluation uses the speedrun's fixed validation
windows (nanoGPT draws eval_iters random batches) and its time is not counted, and there is
no checkpointing or logging to the console per iteration.

torch is imported inside the functions (an optional heavy dependency: the rest of
experiments/ runs without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

from experiments.speedrun.data import windows


def passive_openmp(env=os.environ) -> None:
  """OMP_WAIT_POLICY=PASSIVE unless set, before torch is imported. On a shared machine torch's
  spinning OpenMP threads make a baby iteration 8-25x slower (1.2-4 s against 0.15 s at load
  12 on 2 cores); on an idle one the policy changes little. It only ever helps the reference."""
  env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """nanoGPT's config/train_shakespeare_char.py with the README's CPU ("baby") overrides."""
  n_layer: int = 4
  n_head: int = 4
  n_embd: int = 128
  block_size: int = 64
  batch_size: int = 12
  bias: bool = False
  dropout: float = 0.0
  learning_rate: float = 1e-3
  max_iters: int = 2000
  lr_decay_iters: int = 2000
  min_lr: float = 1e-4
  warmup_iters: int = 100
  beta1: float = 0.9
  beta2: float = 0.99
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  eval_interval: int = 250
  seed: int = 1337


def build_gpt(vocab_size: int, r: Recipe):
  """nanoGPT's GPT (model.py), initialized as there."""
  import torch
  import torch.nn.functional as F
  from torch import nn

  class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(ndim))
      self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
      return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)

  class CausalSelfAttention(nn.Module):
    def __init__(self):
      super().__init__()
      self.c_attn = nn.Linear(r.n_embd, 3 * r.n_embd, bias=r.bias)
      self.c_proj = nn.Linear(r.n_embd, r.n_embd, bias=r.bias)
      self.resid_dropout = nn.Dropout(r.dropout)

    def forward(self, x):
      b, t, c = x.size()
      q, k, v = self.c_attn(x).split(r.n_embd, dim=2)
      q, k, v = (z.view(b, t, r.n_head, c // r.n_head).transpose(1, 2) for z in (q, k, v))
      y = F.scaled_dot_product_attention(
          q, k, v, attn_mask=None, dropout_p=r.dropout if self.training else 0, is_causal=True)
      y = y.transpose(1, 2).contiguous().view(b, t, c)
      return self.resid_dropout(self.c_proj(y))

  class MLP(nn.Module):
    def __init__(self):
      super().__init__()
      self.c_fc = nn.Linear(r.n_embd, 4 * r.n_embd, bias=r.bias)
      self.gelu = nn.GELU()
      self.c_proj = nn.Linear(4 * r.n_embd, r.n_embd, bias=r.bias)
      self.dropout = nn.Dropout(r.dropout)

    def forward(self, x):
      return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1, self.attn = LayerNorm(r.n_embd, r.bias), CausalSelfAttention()
      self.ln_2, self.mlp = LayerNorm(r.n_embd, r.bias), MLP()

    def forward(self, x):
      x = x + self.attn(self.ln_1(x))
      return x + self.mlp(self.ln_2(x))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.transformer = nn.ModuleDict(dict(
          wte=nn.Embedding(vocab_size, r.n_embd), wpe=nn.Embedding(r.block_size, r.n_embd),
          drop=nn.Dropout(r.dropout), h=nn.ModuleList([Block() for _ in range(r.n_layer)]),
          ln_f=LayerNorm(r.n_embd, r.bias)))
      self.lm_head = nn.Linear(r.n_embd, vocab_size, bias=False)
      self.transformer.wte.weight = self.lm_head.weight  # weight tying
      self.apply(self._init_weights)
      for name, p in self.named_parameters():
        if name.endswith("c_proj.weight"):
          torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * r.n_layer))

    def _init_weights(self, module):
      if isinstance(module, nn.Linear):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
          torch.nn.init.zeros_(module.bias)
      elif isinstance(module, nn.Embedding):
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
      t = idx.size(1)
      pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
      x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
      for block in self.transformer.h:
        x = block(x)
      x = self.transformer.ln_f(x)
      logits = self.lm_head(x)
      if targets is None:
        return logits, None
      loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                             ignore_index=-1)
      return logits, loss

  return GPT()


def configure_optimizers(net, r: Recipe):
  """nanoGPT's GPT.configure_optimizers on a CPU: decay >= 2-D params only, fused=False."""
  import torch

  params = {n: p for n, p in net.named_parameters() if p.requires_grad}
  groups = [{"params": [p for p in params.values() if p.dim() >= 2],
             "weight_decay": r.weight_decay},
            {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=r.learning_rate, betas=(r.beta1, r.beta2), fused=False)


def get_lr(it: int, r: Recipe) -> float:
  """train.py's get_lr: linear warmup, cosine decay to min_lr, then min_lr."""
  if it < r.warmup_iters:
    return r.learning_rate * (it + 1) / (r.warmup_iters + 1)
  if it > r.lr_decay_iters:
    return r.min_lr
  ratio = (it - r.warmup_iters) / (r.lr_decay_iters - r.warmup_iters)
  return r.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r.learning_rate - r.min_lr)


def get_batch(data: np.ndarray, r: Recipe):
  """train.py's get_batch on a CPU: B random offsets, int64 [B, T] inputs and targets."""
  import torch

  ix = torch.randint(len(data) - r.block_size, (r.batch_size,))
  x = torch.stack([torch.from_numpy(data[i:i + r.block_size].astype(np.int64)) for i in ix])
  y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + r.block_size].astype(np.int64))
                   for i in ix])
  return x, y


def eval_loss(net, val: np.ndarray, offsets: np.ndarray, block_size: int, rows: int) -> float:
  """Mean cross-entropy over the fixed windows (data.windows: the ones our side sees too)."""
  import torch

  inputs_WT, targets_WT = windows(val, offsets, block_size)
  net.eval()
  total = 0.0
  with torch.no_grad():
    for start in range(0, len(offsets), rows):
      x = torch.from_numpy(inputs_WT[start:start + rows].astype(np.int64))
      y = torch.from_numpy(targets_WT[start:start + rows].astype(np.int64))
      _, loss = net(x, y)
      total += float(loss) * len(x)
  net.train()
  return total / len(offsets)


def train(data_dir: str, r: Recipe, *, eval_rows: int = 96, log=print) -> dict:
  """train.py's loop; returns the validation curve against training wall time (no eval)."""
  import torch

  t0 = time.perf_counter()
  train_data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
  val_data = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
  offsets = np.load(os.path.join(data_dir, "eval_offsets.npy"))
  with open(os.path.join(data_dir, "meta.json")) as f:
    vocab_size = json.load(f)["vocab_size"]
  torch.manual_seed(r.seed)
  net = build_gpt(vocab_size, r)
  optimizer = configure_optimizers(net, r)
  curve, paused = [], 0.0
  x, y = get_batch(train_data, r)
  for it in range(r.max_iters + 1):
    lr = get_lr(it, r)
    for group in optimizer.param_groups:
      group["lr"] = lr
    if it % r.eval_interval == 0 and it > 0:
      e0 = time.perf_counter()
      curve.append({"step": it, "seconds": e0 - t0 - paused,
                    "val_loss": eval_loss(net, val_data, offsets, r.block_size, eval_rows)})
      log(f"  reference step {it:5d}  {curve[-1]['seconds']:7.1f} s  "
          f"val {curve[-1]['val_loss']:.4f}")
      paused += time.perf_counter() - e0
    _, loss = net(x, y)
    x, y = get_batch(train_data, r)
    loss.backward()
    if r.grad_clip:
      torch.nn.utils.clip_grad_norm_(net.parameters(), r.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
  seconds = time.perf_counter() - t0 - paused
  final = eval_loss(net, val_data, offsets, r.block_size, eval_rows)
  curve.append({"step": r.max_iters + 1, "seconds": seconds, "val_loss": final})
  log(f"  reference done  {seconds:7.1f} s  val {final:.4f}")
  return {"recipe": dataclasses.asdict(r), "torch": torch.__version__,
          "threads": torch.get_num_threads(), "final_val_loss": final, "seconds": seconds,
          "iters": r.max_iters + 1, "tokens_per_sec":
          (r.max_iters + 1) * r.batch_size * r.block_size / seconds, "curve": curve}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", required=True,
                      help="train.bin, val.bin (uint16), eval_offsets.npy, meta.json")
  parser.add_argument("--out", required=True, help="write the result as JSON here")
  parser.add_argument("--max_iters", type=int, default=Recipe.max_iters,
                      help="iterations (and lr_decay_iters)")
  parser.add_argument("--eval_interval", type=int, default=Recipe.eval_interval)
  parser.add_argument("--seed", type=int, default=Recipe.seed, help="torch.manual_seed")
  args = parser.parse_args(argv)
  r = Recipe(max_iters=args.max_iters, lr_decay_iters=args.max_iters,
             warmup_iters=min(Recipe.warmup_iters, args.max_iters // 2),
             eval_interval=args.eval_interval, seed=args.seed)
  result = train(args.data_dir, r)
  with open(args.out, "w") as f:
    json.dump(result, f)
  return 0


if __name__ == "__main__":
  sys.exit(main())
