"""The tokenizer of a Hugging Face model directory, installed into a workdir (and back).

Looked for in this order:
  tokenizer.json            -> HFTokenizer (the `tokenizers` library; what HF fast tokenizers use)
  tokenizer.model           -> SentencePieceTokenizer (Llama/Mistral/Phi-3 sentencepiece file)
  vocab.json + merges.txt   -> converted to tokenizer.json (byte-level BPE, as transformers'
                               GPT2Converter does), then HFTokenizer

Special ids: bos/eos/pad from generation_config.json, then config.json, then
tokenizer_config.json's token strings (the first that names an id inside the
vocabulary); eos may be a list there (Phi-3 stops on 32000, 32001, 32007), and
the whole list is returned as `stop_ids`. Whether a BOS is prepended comes from
tokenizer_config.json's add_bos_token, else from what tokenizer.json's own
post-processor does.
"""

from __future__ import annotations

import json
import logging
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from model.hf.safetensors_io import CheckpointError, read_json
from model.store.files import atomic_open, copy_file, write_json
from model.store.tokenizer import HFTokenizer, SentencePieceTokenizer

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"


def find_tokenizer(path: str) -> tuple[str, str]:
  """(kind, file) of the tokenizer in directory `path` (or `path` itself, a file)."""
  if os.path.isfile(path):
    if path.endswith(".json"):
      return "huggingface", path
    if path.endswith(".model"):
      return "sentencepiece", path
    raise CheckpointError(f"tokenizer {path}: expected a tokenizer.json or a sentencepiece "
                          ".model file")
  for name, kind in ((TOKENIZER_JSON, "huggingface"), (SENTENCEPIECE_MODEL, "sentencepiece")):
    if os.path.exists(os.path.join(path, name)):
      return kind, os.path.join(path, name)
  if all(os.path.exists(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
    return "bpe_files", path
  raise CheckpointError(
      f"no tokenizer in {path} (looked for {TOKENIZER_JSON}, {SENTENCEPIECE_MODEL}, "
      "vocab.json + merges.txt); pass one with --tokenizer=PATH")


def bpe_files_to_tokenizer_json(directory: str, out_path: str) -> None:
  """GPT-2 style vocab.json + merges.txt -> an equivalent byte-level BPE tokenizer.json."""
  vocab_path = os.path.join(directory, "vocab.json")
  tok = Tokenizer(models.BPE.from_file(vocab_path, os.path.join(directory, "merges.txt"),
                                       continuing_subword_prefix="", end_of_word_suffix="",
                                       fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  with open(vocab_path) as f:
    vocab = json.load(f)
  config = read_json(os.path.join(directory, "tokenizer_config.json"), required=False)
  specials = {_token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token",
                                                   "unk_token")} | {"<|endoftext|>"}
  tok.add_special_tokens([AddedToken(s, special=True) for s in sorted(specials - {None})
                          if s in vocab])
  with atomic_open(out_path, "w") as f:
    f.write(tok.to_str(pretty=True))


def _token_text(token) -> str | None:
  """tokenizer_config.json writes a special token as a string or as {"content": string}."""
  if isinstance(token, dict):
    return token.get("content")
  return token if isinstance(token, str) else None


def special_ids(hf_dir: str, token_to_id, vocab_size: int, encode_with_specials=None) -> dict:
  """{'bos_id', 'eos_id', 'pad_id', 'stop_ids', 'add_bos'} for the model in hf_dir.

  token_to_id(text) -> id or None; encode_with_specials(text) -> ids the tokenizer
  itself produces with its special tokens (to see whether it prepends a BOS).
  """
  generation = read_json(os.path.join(hf_dir, "generation_config.json"), required=False)
  config = read_json(os.path.join(hf_dir, "config.json"), required=False)
  tok_config = read_json(os.path.join(hf_dir, "tokenizer_config.json"), required=False)

  def ids_of(field: str) -> list[int]:
    for source in (generation, config):
      value = source.get(f"{field}_token_id")
      ids = [v for v in (value if isinstance(value, list) else [value])
             if isinstance(v, int) and 0 <= v < vocab_size]
      if ids:
        return ids
    text = _token_text(tok_config.get(f"{field}_token"))
    token = token_to_id(text) if text is not None else None
    return [token] if token is not None and 0 <= token < vocab_size else []

  bos, eos, pad = ids_of("bos"), ids_of("eos"), ids_of("pad")
  out = {"bos_id": bos[0] if bos else None, "eos_id": eos[0] if eos else None,
         "pad_id": pad[0] if pad else None, "stop_ids": eos}
  if "add_bos_token" in tok_config:
    out["add_bos"] = bool(tok_config["add_bos_token"]) and out["bos_id"] is not None
  elif encode_with_specials is not None and out["bos_id"] is not None:
    out["add_bos"] = encode_with_specials("a")[:1] == [out["bos_id"]]
  else:
    out["add_bos"] = False
  return out


def install_tokenizer(hf_dir: str, workdir: str, tokenizer_path: str | None = None):
  """Copy the model's tokenizer into workdir; returns (tokenizer object, stop_ids)."""
  kind, source = find_tokenizer(tokenizer_path or hf_dir)
  os.makedirs(workdir, exist_ok=True)
  if kind == "sentencepiece":
    target = os.path.join(workdir, SENTENCEPIECE_MODEL)
    copy_file(source, target)
    tok = SentencePieceTokenizer(target)
    ids = special_ids(hf_dir, lambda t: _none_if_unknown(tok.sp.piece_to_id(t), tok.sp),
                      tok.vocab_size)
    if ids["add_bos"]:
      logging.warning("%s prepends BOS (%s) to prompts; SentencePieceTokenizer does not, so "
                      "prompts encoded from the workdir lack it", hf_dir, ids["bos_id"])
    return tok, ids["stop_ids"]
  target = os.path.join(workdir, TOKENIZER_JSON)
  if kind == "bpe_files":
    bpe_files_to_tokenizer_json(source, target)
  else:
    copy_file(source, target)
  raw = Tokenizer.from_file(target)
  ids = special_ids(hf_dir, raw.token_to_id, raw.get_vocab_size(with_added_tokens=True),
                    lambda text: raw.encode(text, add_special_tokens=True).ids)
  tok = HFTokenizer(target, bos_id=ids["bos_id"], eos_id=ids["eos_id"], pad_id=ids["pad_id"],
                    add_bos=ids["add_bos"])
  return tok, ids["stop_ids"]


def _none_if_unknown(piece_id: int, sp) -> int | None:
  return None if piece_id == sp.unk_id() else piece_id


def export_tokenizer(tokenizer, out_dir: str) -> None:
  """Write a workdir's tokenizer into an HF directory, for AutoTokenizer.from_pretrained.

  A tokenizer.json gets a tokenizer_config.json naming its special tokens, and, when
  the workdir prepends BOS but the file's own post-processor does not, a post-processor
  that does (a plain fast tokenizer ignores add_bos_token).
  """
  path = getattr(tokenizer, "path", None)
  if path is None:
    logging.warning("the byte tokenizer has no Hugging Face file; the export has no tokenizer")
    return
  target = os.path.join(out_dir, os.path.basename(path))
  if not path.endswith(".json"):
    copy_file(path, target)
    return
  tok = Tokenizer.from_file(path)
  if tokenizer.add_bos and tok.encode("a", add_special_tokens=True).ids[:1] != [tokenizer.bos_id]:
    bos = tok.id_to_token(tokenizer.bos_id)
    template = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1",
                                             special_tokens=[(bos, tokenizer.bos_id)])
    tok.post_processor = (template if tok.post_processor is None
                          else processors.Sequence([tok.post_processor, template]))
  with atomic_open(target, "w") as f:
    f.write(tok.to_str(pretty=True))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tokenizer.add_bos}
  for field in ("bos", "eos", "pad"):
    token_id = getattr(tokenizer, f"{field}_id")
    if token_id is not None:
      config[f"{field}_token"] = tok.id_to_token(token_id)
  write_json(os.path.join(out_dir, "tokenizer_config.json"), config, sort_keys=True)
