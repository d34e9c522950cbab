"""Indirect object identification (IOI) demo task and the small model trained on it.

Why this exists: the offline demo (``atp demo``) and the benchmarks need a real
transformer with a real circuit to attribute, but must not download anything.
So the project trains its own tiny transformer on a word-level IOI task (as a TransformerLens 3
``HookedTransformer``) and ships the weights, config and tokenizer as package data in
``atp_plugin/data/``. Under TransformerLens 4, which has no ``HookedTransformer``, the same
weights load as a GPT-2 ``TransformerBridge``.

The task: "When Mary and John went to the store, John gave a drink to" -> " Mary".
The answer is the name among the first two that is *not* repeated.  The corrupt
prompt repeats the other name instead, which flips the answer, and is
token-aligned with the clean one (every name is a single token).

Every template is exactly :data:`PROMPT_LENGTH` tokens long (plus BOS), so any mix
of prompts batches without padding and the answer is always predicted at the
last position.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import einops
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file as save_safetensors_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .errors import MissingDependencyError
from .saes import SimpleSAE, TopKSAE, load_topk_transcoder

if TYPE_CHECKING:

    import transformers
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

__all__ = [
    "NAMES",
    "PLACES",
    "OBJECTS",
    "TEMPLATES",
    "PROMPT_LENGTH",
    "SPLIT_SIZES",
    "MODEL_CONFIG",
    "IOIPairs",
    "build_tokenizer",
    "ioi_pairs",
    "load_demo_model",
    "demo_gpt2",
    "load_demo_sae",
    "load_demo_transcoders",
    "train_demo_model",
    "evaluate_demo_model",
]

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "Anna", "James", "Sarah", "David", "Emma", "Paul", "Laura",
    "Mark", "Kate", "Peter", "Lucy", "Daniel", "Alice", "Robert", "Grace", "Michael", "Rose",
)
PLACES: tuple[str, ...] = (
    "store", "park", "school", "office", "garden",
    "station", "market", "beach", "library", "restaurant",
)
OBJECTS: tuple[str, ...] = (
    "drink", "book", "ring", "bone", "ball", "kiss", "letter", "gift", "key", "snack",
)

# {A} and {B} are the two names introduced first; {C} is the repeated name (the
# subject).  The answer is whichever of {A}, {B} differs from {C}.
TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
    "While {A} and {B} were at the {PLACE}, {C} handed a {OBJECT} to",
    "Once {A} and {B} arrived at the {PLACE}, {C} threw a {OBJECT} to",
    "Since {A} and {B} were in the {PLACE}, {C} brought a {OBJECT} to",
    "The {PLACE} was where {A} and {B} met. {C} sent a {OBJECT} to",
    "{A} and {B} got a {OBJECT} at the {PLACE}. {C} gave it to",
    "{A} and {B} met at the {PLACE}. Then {C} passed a {OBJECT} to",
)
PROMPT_LENGTH = 14  # tokens per prompt, without BOS; the same for every template

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, UNK)

# Same split rule as the `tokenizers` Whitespace pre-tokenizer.
_WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")
_TEMPLATE_WORDS: tuple[str, ...] = tuple(
    sorted(
        {
            word
            for template in TEMPLATES
            for word in _WORD_PATTERN.findall(template.format(A="", B="", C="", PLACE="", OBJECT=""))
        }
    )
)
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + _TEMPLATE_WORDS + NAMES + PLACES + OBJECTS

# Architecture of the shipped model (serialised as config.json next to the weights).
MODEL_CONFIG: dict[str, object] = {
    "model_name": "atp-ioi-demo",
    "n_layers": 4,
    "d_model": 128,
    "n_heads": 4,
    "d_head": 32,
    "d_mlp": 512,
    "n_ctx": 32,
    "d_vocab": len(VOCAB),
    "act_fn": "gelu",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
}

_WEIGHTS_FILE = "model.safetensors"
_CONFIG_FILE = "config.json"
_TOKENIZER_FILE = "tokenizer.json"
_SAE_DIR = "sae"  # SAE-Lens save format (cfg.json + sae_weights.safetensors), scripts/train_demo_sae.py
_TRANSCODER_DIR = "transcoders"  # layer{L}/cfg.json + weights.safetensors, scripts/train_demo_transcoders.py
_TEST_FRACTION_PERCENT = 20  # share of (names, place, object, template) families held out
# Distinct pairs per split: two per family (either name may be the repeated one). Counted by
# enumerating every family (0.6 s, too slow for each call); tests/test_demo_task.py recounts them.
SPLIT_SIZES = {"train": 486_580, "test": 121_420}


@dataclass(frozen=True)
class IOIPairs:
    """Token-aligned clean/corrupt IOI prompts.

    ``answers[i]`` / ``wrongs[i]`` are the correct / incorrect name for ``clean[i]``
    (with a leading space, e.g. ``" Mary"``); on ``corrupt[i]`` their roles swap.
    The usual metric is ``logit(answer) - logit(wrong)`` at the last position.
    """

    clean: list[str]
    corrupt: list[str]
    answers: list[str]
    wrongs: list[str]

    def __len__(self) -> int:
        return len(self.clean)


def build_tokenizer() -> Tokenizer:
    """Build the word-level tokenizer over :data:`VOCAB`.

    Whitespace pre-tokenization drops spaces, so ``" Mary"`` (how TransformerLens
    spells answer tokens) and ``"Mary"`` both map to the Mary token, and ``","`` /
    ``"."`` are tokens of their own.  The post-processor prepends BOS, which is
    what TransformerLens expects from a tokenizer with ``add_bos_token=True``.
    """
    vocab = {token: index for index, token in enumerate(VOCAB)}
    if len(vocab) != len(VOCAB):
        raise ValueError("demo vocabulary has duplicate tokens")
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    # Joins words with spaces and removes the space before punctuation.
    tokenizer.decoder = decoders.WordPiece(cleanup=True)
    return tokenizer


def _to_hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers` tokenizer so HookedTransformer accepts it.

    ``add_bos_token`` and ``name_or_path`` must be set, otherwise TransformerLens
    tries to re-download the tokenizer from the Hub to get a BOS-adding copy.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        name_or_path=str(MODEL_CONFIG["model_name"]),
    )


def _family_split(first: str, second: str, place: str, obj: str, template: int) -> str:
    """Deterministically assign a prompt family to "train" or "test".

    A family is everything but the choice of repeated name, so a clean prompt
    and its corrupt partner always land in the same split.
    """
    digest = hashlib.sha256(f"{first}|{second}|{place}|{obj}|{template}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < _TEST_FRACTION_PERCENT else "train"


def ioi_pairs(n: int, *, seed: int = 0, split: str = "test") -> IOIPairs:
    """Sample ``n`` distinct clean/corrupt IOI pairs from one split.

    Both name orders occur (ABB: "A and B ..., B gave ... to" -> A, and BAB:
    "B and A ..., B gave ... to" -> A).  The corrupt prompt repeats the other
    name, so its answer is the clean prompt's wrong name.  Train and test share
    no (names, place, object, template) family, clean or corrupt.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n > SPLIT_SIZES[split]:
        raise ValueError(f"the {split} split holds {SPLIT_SIZES[split]:,} distinct pairs; ask for at most that many")
    rng = random.Random(f"{split}:{seed}")
    seen: set[tuple[str, str, str, str, int, bool]] = set()
    pairs = IOIPairs(clean=[], corrupt=[], answers=[], wrongs=[])
    while len(pairs) < n:
        first, second = rng.sample(NAMES, 2)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        template = rng.randrange(len(TEMPLATES))
        first_repeated = rng.random() < 0.5
        case = (first, second, place, obj, template, first_repeated)
        if case in seen or _family_split(*case[:5]) != split:
            continue
        seen.add(case)
        subject, indirect_object = (first, second) if first_repeated else (second, first)
        fields = {"A": first, "B": second, "PLACE": place, "OBJECT": obj}
        pairs.clean.append(TEMPLATES[template].format(C=subject, **fields))
        pairs.corrupt.append(TEMPLATES[template].format(C=indirect_object, **fields))
        pairs.answers.append(f" {indirect_object}")
        pairs.wrongs.append(f" {subject}")
    return pairs


def _read_data_file(name: str) -> bytes:
    """Read a file shipped in ``atp_plugin/data`` (works from wheels and zips)."""
    return files("atp_plugin").joinpath("data").joinpath(name).read_bytes()


def _new_model(
    config: dict[str, Any], tokenizer: PreTrainedTokenizerFast, device: str, dtype: torch.dtype
) -> HookedTransformer:
    """Build an (untrained) HookedTransformer from :data:`MODEL_CONFIG`-style settings (TransformerLens 3)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**config, device=device, dtype=dtype)
    return HookedTransformer(cfg, tokenizer=tokenizer)


def _demo_parts() -> tuple[dict[str, Any], PreTrainedTokenizerFast, dict[str, torch.Tensor]]:
    """The shipped config, tokenizer and weights (TransformerLens names), from the package data."""
    config = json.loads(_read_data_file(_CONFIG_FILE))
    tokenizer = _to_hf_tokenizer(Tokenizer.from_str(_read_data_file(_TOKENIZER_FILE).decode()))
    return config, tokenizer, load_safetensors_bytes(_read_data_file(_WEIGHTS_FILE))


def load_demo_model(device: str = "cpu", dtype: torch.dtype = torch.float32, *, bridge: bool | None = None):
    """Load the shipped IOI demo model, tokenizer attached, in eval mode.

    ``bridge=False``: a ``HookedTransformer`` (TransformerLens 3 only); ``bridge=True``: the same
    weights as a GPT-2 ``TransformerBridge`` in compatibility mode (TransformerLens 3 or 4); the
    default takes the ``HookedTransformer`` where it exists. Reads the package data via
    :mod:`importlib.resources`, so it needs no network and works from an installed package.
    """
    if bridge is None:
        bridge = not _has_hooked_transformer()
    if bridge:
        return _load_demo_bridge(device, dtype)
    if not _has_hooked_transformer():
        raise MissingDependencyError("the demo model as a HookedTransformer needs TransformerLens 3 "
                                     "(pip install 'transformer-lens>=3,<4'); use load_demo_model(bridge=True)")
    config, tokenizer, state = _demo_parts()
    model = _new_model(config, tokenizer, device, dtype)
    model.load_state_dict(state)
    return model.eval()


def _has_hooked_transformer() -> bool:
    """Whether this TransformerLens has ``HookedTransformer`` (3.x; 4.x removed it)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def demo_gpt2(dtype: torch.dtype = torch.float32) -> tuple[transformers.GPT2LMHeadModel, PreTrainedTokenizerFast]:
    """The demo model as a Hugging Face ``GPT2LMHeadModel`` (the same function: LayerNorm, exact
    GELU, learned positions, untied unembedding) and its tokenizer.

    GPT-2 has no unembedding bias; the demo model's ``b_U`` is kept by giving ``lm_head`` one, so
    the logits are the demo model's own (a directory written with ``save_pretrained`` drops it:
    every logit then moves by a per-token constant, which cancels in logit differences).
    """
    import transformers

    config, tokenizer, state = _demo_parts()
    hf_config = transformers.GPT2Config(
        vocab_size=config["d_vocab"], n_positions=config["n_ctx"], n_embd=config["d_model"],
        n_layer=config["n_layers"], n_head=config["n_heads"], n_inner=config["d_mlp"], activation_function="gelu",
        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    # transformers declares PreTrainedModel.to with functools.wraps(nn.Module.to), which types it as unbound
    hf = transformers.GPT2LMHeadModel(hf_config).to(dtype)  # type: ignore[arg-type]
    missing, unexpected = hf.load_state_dict(_gpt2_state_dict(state, int(config["n_layers"])), strict=False)
    if unexpected or any(not k.endswith(("attn.bias", "masked_bias")) for k in missing):
        raise RuntimeError(f"GPT-2 export does not match: missing {missing}, unexpected {unexpected}")
    hf.lm_head.bias = torch.nn.Parameter(state["unembed.b_U"].to(dtype).clone())
    return hf.eval(), tokenizer


def _gpt2_state_dict(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """A ``GPT2LMHeadModel`` state dict from the demo model's TransformerLens state dict
    (TransformerLens's GPT-2 import, inverted)."""
    sd: dict[str, torch.Tensor] = {
        "transformer.wte.weight": state["embed.W_E"],           # [d_vocab, d_model]
        "transformer.wpe.weight": state["pos_embed.W_pos"],     # [n_ctx, d_model]
        "transformer.ln_f.weight": state["ln_final.w"],
        "transformer.ln_f.bias": state["ln_final.b"],
        "lm_head.weight": state["unembed.W_U"].T,               # [d_vocab, d_model]
    }
    for layer in range(n_layers):
        tl, h = f"blocks.{layer}", f"transformer.h.{layer}"
        # Conv1D weights are [in, out]; TransformerLens's are [head, d_model, d_head]
        qkv = [einops.rearrange(state[f"{tl}.attn.W_{x}"], "head d_model d_head -> d_model (head d_head)")
               for x in "QKV"]
        sd |= {
            f"{h}.ln_1.weight": state[f"{tl}.ln1.w"], f"{h}.ln_1.bias": state[f"{tl}.ln1.b"],
            f"{h}.ln_2.weight": state[f"{tl}.ln2.w"], f"{h}.ln_2.bias": state[f"{tl}.ln2.b"],
            f"{h}.attn.c_attn.weight": torch.cat(qkv, dim=1),  # [d_model, 3 * d_model]
            f"{h}.attn.c_attn.bias": torch.cat([state[f"{tl}.attn.b_{x}"].flatten() for x in "QKV"]),
            f"{h}.attn.c_proj.weight": einops.rearrange(state[f"{tl}.attn.W_O"],
                                                        "head d_head d_model -> (head d_head) d_model"),
            f"{h}.attn.c_proj.bias": state[f"{tl}.attn.b_O"],
            f"{h}.mlp.c_fc.weight": state[f"{tl}.mlp.W_in"],    # [d_model, d_mlp]
            f"{h}.mlp.c_fc.bias": state[f"{tl}.mlp.b_in"],
            f"{h}.mlp.c_proj.weight": state[f"{tl}.mlp.W_out"],  # [d_mlp, d_model]
            f"{h}.mlp.c_proj.bias": state[f"{tl}.mlp.b_out"],
        }
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _load_demo_bridge(device: str, dtype: torch.dtype):
    """The demo model booted as a ``TransformerBridge`` in compatibility mode, offline."""
    from transformer_lens.model_bridge import TransformerBridge

    hf, tokenizer = demo_gpt2(dtype)
    # hf.to: transformers types PreTrainedModel.to (functools.wraps(nn.Module.to)) as unbound
    model = TransformerBridge.boot_transformers(str(MODEL_CONFIG["model_name"]), hf_model=hf.to(device),  # type: ignore[arg-type]
                                                tokenizer=tokenizer, dtype=dtype, device=device)
    model.enable_compatibility_mode(disable_warnings=True)
    return model.eval()


def load_demo_sae(device: str = "cpu", dtype: torch.dtype = torch.float32) -> SAE | TopKSAE:
    """Load the SAE shipped with the demo model: top-k (k=16), 512 features, on
    ``blocks.2.hook_resid_pre``, trained by ``scripts/train_demo_sae.py`` with SAE-Lens's runner.

    Read with SAE-Lens's own ``SAE.load_from_disk`` where SAE-Lens is installed, else as an
    ``atp_plugin.saes.TopKSAE`` (the same function, no SAE-Lens: TransformerLens 4). When the package
    is not a plain directory (a zip), its two files are copied to a temporary directory first.
    """
    root = files("atp_plugin").joinpath("data").joinpath(_SAE_DIR)
    if isinstance(root, Path):
        return _read_sae(root, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        for item in root.iterdir():
            (Path(tmp) / item.name).write_bytes(item.read_bytes())
        return _read_sae(Path(tmp), device, dtype)


def _read_sae(path: Path, device: str, dtype: torch.dtype) -> SAE | TopKSAE:
    if importlib.util.find_spec("sae_lens") is None:
        return TopKSAE.load(path, dtype=dtype, device=device).eval()
    # imported here, not at the top: SAE-Lens is slow to import and only this function needs it
    from sae_lens import SAE

    return SAE.load_from_disk(path, device=device, dtype=str(dtype).removeprefix("torch.")).eval()


def load_demo_transcoders(device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[SimpleSAE]:
    """Load the transcoders shipped with the demo model, one per layer (index L is layer L's):
    transcoder L reads ``blocks.L.ln2.hook_normalized`` (LayerNorm's output before its weight and
    bias) and writes ``blocks.L.hook_mlp_out``; top-k (k=16), 512 features, trained by
    ``scripts/train_demo_transcoders.py`` on train-split IOI prompts.

    Each is an ``atp_plugin.saes.SimpleSAE`` with ``activation=TopK(k)`` and ``hook_name`` /
    ``hook_name_out`` set, in eval mode: ``atp_plugin.adapters.TranscoderFeatures(tc)`` takes it as it
    is, under TransformerLens 3 or 4 (no SAE-Lens needed). Read via :mod:`importlib.resources`,
    so it works from an installed package.
    """
    root = files("atp_plugin").joinpath("data").joinpath(_TRANSCODER_DIR)
    return [load_topk_transcoder(root.joinpath(f"layer{layer}"), device, dtype)
            for layer in range(int(str(MODEL_CONFIG["n_layers"])))]


def _batch_loss(
    model: HookedTransformer, prompts: list[str], answers: list[str], lm_weight: float
) -> tuple[torch.Tensor, float]:
    """Loss on one batch: CE of the answer at the last position + ``lm_weight`` x LM loss.

    The LM term (next-token prediction on the prompt itself) is a cheap auxiliary
    signal: predicting the repeated name already requires copying earlier names.
    Returns the loss and the batch accuracy on the answer token.
    """
    tokens = model.to_tokens([p + a for p, a in zip(prompts, answers)])  # [batch, 1 + PROMPT_LENGTH + 1]
    logits = model(tokens[:, :-1])  # [batch, pos, vocab]
    token_losses = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # [batch, pos]
    loss = token_losses[:, -1].mean() + lm_weight * token_losses[:, :-1].mean()
    accuracy = (logits[:, -1].argmax(-1) == tokens[:, -1]).float().mean().item()
    return loss, accuracy


@contextmanager
def _deterministic_algorithms() -> Iterator[None]:
    """Temporarily force deterministic torch kernels.

    Some multi-threaded CPU backward kernels accumulate in a racy order, which
    would make two training runs with the same seed differ in the last bits.
    """
    previous, previous_warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


def train_demo_model(
    out_dir: str | Path,
    *,
    steps: int = 800,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 200,
    lm_weight: float = 0.1,
    log_every: int = 250,
) -> HookedTransformer:
    """Train the demo model from scratch on the IOI train split and save it.

    Recipe: AdamW, linear warmup then cosine decay, fresh random train-split
    prompts every step (clean and corrupt prompts are both valid IOI prompts, so
    sampling covers both), loss = answer cross entropy + ``lm_weight`` x LM loss.
    Bit-for-bit deterministic given ``seed`` and the torch thread count.  Writes
    ``model.safetensors``, ``config.json`` and ``tokenizer.json`` into ``out_dir``
    and returns the trained model in eval mode.
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = _new_model(MODEL_CONFIG, _to_hf_tokenizer(tokenizer), "cpu", torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-2, total_iters=warmup_steps),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup_steps)),
        ],
        milestones=[warmup_steps],
    )
    model.train()
    start = time.perf_counter()
    with _deterministic_algorithms():
        for step in range(1, steps + 1):
            batch = ioi_pairs(batch_size, seed=seed * 1_000_003 + step, split="train")
            loss, accuracy = _batch_loss(model, batch.clean, batch.answers, lm_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % log_every == 0 or step == steps:
                print(
                    f"step {step:5d}/{steps}  loss {loss.item():.4f}  "
                    f"batch acc {accuracy:.3f}  {time.perf_counter() - start:.0f}s",
                    flush=True,
                )
    model.eval()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors_file(model.state_dict(), str(out / _WEIGHTS_FILE))
    (out / _CONFIG_FILE).write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    tokenizer.save(str(out / _TOKENIZER_FILE))
    return model


@torch.no_grad()
def evaluate_demo_model(model: HookedTransformer, n: int = 1000, *, seed: int = 1234) -> dict[str, float]:
    """Score ``model`` on ``n`` held-out (test split) IOI pairs.

    Returns:
        ``accuracy``: share of clean prompts whose answer is the argmax among all names;
        ``pairwise_accuracy``: share with logit(answer) > logit(wrong);
        ``logit_diff``: mean logit(answer) - logit(wrong) on clean prompts;
        ``corrupt_logit_diff``: the same quantity on corrupt prompts (should be negative).
    """
    pairs = ioi_pairs(n, seed=seed, split="test")
    device = next(model.parameters()).device
    name_ids = torch.tensor([model.to_single_token(f" {name}") for name in NAMES], device=device)  # [names]
    answer_ids = torch.tensor([model.to_single_token(a) for a in pairs.answers], device=device)  # [batch]
    wrong_ids = torch.tensor([model.to_single_token(w) for w in pairs.wrongs], device=device)  # [batch]

    def last_logits(prompts: list[str]) -> torch.Tensor:
        return model(model.to_tokens(prompts))[:, -1].float()  # [batch, vocab]

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return logits.gather(1, answer_ids[:, None])[:, 0] - logits.gather(1, wrong_ids[:, None])[:, 0]  # [batch]

    clean = last_logits(pairs.clean)
    corrupt = last_logits(pairs.corrupt)
    top_name = name_ids[clean[:, name_ids].argmax(-1)]  # [batch]
    clean_diff = logit_diff(clean)
    return {
        "accuracy": (top_name == answer_ids).float().mean().item(),
        "pairwise_accuracy": (clean_diff > 0).float().mean().item(),
        "logit_diff": clean_diff.mean().item(),
        "corrupt_logit_diff": logit_diff(corrupt).mean().item(),
        "n": float(n),
    }
