"""LODA during sampling, as attention observers: map capture for stage 1 and the masks, the stage-2 fixing bias,
layer selection, and the run report (method §3.1, §3.3, §4).

The sampler (ComfyUI glue) owns the loop; these objects only see `AttentionCall`s, q, k and probabilities. They
need autograd where stated and never toggle grad modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .attention_calls import COND, UNCOND, AttentionCall
from .attention_fixing import build_fixing_bias, build_fixing_masks, resize_masks_nearest
from .errors import ConceptSplitError
from .loda_config import LodaConfig
from .loda_loss import AE_KERNEL_SIZE
from .model_layout import LayerKey, ModelLayout, map_grid
from .token_value_delta import identifier_rows

__all__ = [
    "FixingBias",
    "LodaConcepts",
    "LodaPlan",
    "MapCollector",
    "MapLayers",
    "StepRecord",
    "build_concept_masks",
    "format_report",
    "loda_stage1_steps",
    "map_grid",
    "plan_loda_run",
    "run_truncated",
    "select_map_layers",
]


class _TruncatedForward(Exception):
    """Raised after the last layer the stage-1 loss needs, so the rest of the decoder never runs (method §3.3)."""


def run_truncated(forward: Callable[[], object]) -> None:
    """Call `forward`; a truncation raised by a `MapCollector` ends it early and is swallowed."""
    try:
        forward()
    except _TruncatedForward:
        pass


@dataclass(frozen=True)
class LodaConcepts:
    """The object concepts LODA separates, in concept order (method §5 roles: objects only)."""

    labels: tuple[str, ...]  # shown in the report and the viewer, e.g. ("dog", "cat")
    positions: tuple[int, ...]  # s_k in the flat prompt sequence, SOT at 0 (method §2.4)
    prompt_length: int  # L = 77 · windows of the positive prompt
    prompt_ids: Optional[tuple] = None  # its token ids, to tell its chunks from other positives' (ConditioningCombine)

    def __post_init__(self) -> None:
        if len(self.positions) < 2:
            raise ConceptSplitError.build(
                "LODA separates concepts and needs at least 2 object concepts",
                seen=f"{len(self.positions)} object concept(s): {', '.join(self.labels) or 'none'}",
                expected="2 or more concept words, or 2 or more object adapters on the model",
                fix="write two or more comma-separated concept words (e.g. 'dog, cat'), or connect a second "
                "object adapter to Apply ToVA",
            )

    def columns(self, context_length: int, own_length: Optional[int] = None) -> list[list[int]]:
        """Columns of each concept in a context of T tokens: s_k + c·L for every LCM copy c (integration §1.6), where
        L is
        the chunk's own conditioning length (`own_length`, default the prompt's). The same rows ToVA adds its delta
        to (token_value_delta.identifier_rows); empty for a concept whose s_k lies beyond a shorter conditioning."""
        length = own_length or self.prompt_length
        rows = [identifier_rows(p, length, context_length) for p in self.positions]
        return [[] if r is None else list(range(context_length)[r]) for r in rows]

    def chunks(self, call: AttentionCall, branches) -> tuple[tuple[int, int], ...]:
        """(chunk index, own length) of the chunks of `call` in `branches` whose columns s_k are these concepts':
        other positive prompts in the batch are left out (attention_calls.chunk_holds_prompt), and so is a
        conditioning too short to have every s_k (a one-window negative beside a two-window prompt)."""
        last = max(self.positions)
        return tuple(
            (index, length)
            for index, length in call.prompt_chunks(branches, self.prompt_ids, self.prompt_length)
            if last < length
        )


@dataclass(frozen=True)
class MapLayers:
    """Which cross-attention layers LODA reads and biases (method §3.1, §4.3)."""

    grid: tuple[int, int]  # (h, w) of the map level
    loss_keys: tuple[LayerKey, ...]  # stage-1 loss layers, execution order; the last one ends the gradient pass
    mask_keys: tuple[LayerKey, ...]  # layers averaged for the stage-2 masks
    fixing_keys: Optional[frozenset]  # layers that get the bias; None = every cross-attention layer


def select_map_layers(layout: ModelLayout, latent_hw: tuple[int, int], fixing_layers: str) -> MapLayers:
    """Pick LODA's layers from the layout's data (method §3.1): the map layers (`AttentionSite.map`, the family's map
    level, e.g. latent/4 for the SD UNets) give the masks, those of them marked `loss` the stage-1 loss.

    Args:
        layout: the host model's layers, in execution order. latent_hw: (H_lat, W_lat).
        fixing_layers: "all" (every layer of the layout gets the bias) or "map_level" (the map layers only).
    Raises:
        ConceptSplitError: no map or loss layer, or maps smaller than the 7×7 smoothing kernel.
    """
    at_level = tuple(site for site in layout.layers if site.map)
    loss_keys = tuple(site.key for site in at_level if site.loss)
    if not at_level or not loss_keys:
        raise ConceptSplitError.build(
            "This model has no cross-attention layers at the level LODA reads its maps from",
            seen=f"{len(layout.layers)} text-attention layers of this {layout.display_name} model, "
            f"{len(at_level)} at the map level, {len(loss_keys)} of them usable for the loss",
            expected="a model whose family has text-attention layers at its map level (SD UNets: latent/4 in the "
            "down blocks)",
            fix="use LODA with a supported checkpoint (SD1.5, SD2.1, SDXL)",
        )
    levels = {site.level for site in at_level}
    grids = {map_grid(latent_hw, level) for level in levels}
    grid = min(grids)
    if len(grids) > 1:
        raise ConceptSplitError.build(
            "The model's map layers have different grids",
            seen=f"grids {sorted(grids)}",
            expected="one grid for every map layer",
            fix="report this model to the pack's authors",
        )
    if min(grid) < AE_KERNEL_SIZE:
        level = max(levels)
        side = AE_KERNEL_SIZE * layout.latent_scale * 2**level
        raise ConceptSplitError.build(
            "Unsupported resolution: the LODA attention maps are smaller than the smoothing kernel",
            seen=f"latent {latent_hw[0]}×{latent_hw[1]} gives {grid[0]}×{grid[1]} maps at latent/{2**level}",
            expected=f"maps of at least {AE_KERNEL_SIZE}×{AE_KERNEL_SIZE} (24×24 at 768 px for SD2.1)",
            fix=f"use an image of at least {side}×{side} px",
        )
    mask_keys = tuple(site.key for site in at_level)
    fixing = None if fixing_layers == "all" else frozenset(mask_keys)
    return MapLayers(grid=grid, loss_keys=loss_keys, mask_keys=mask_keys, fixing_keys=fixing)


@dataclass(frozen=True)
class LodaPlan:
    """A LODA request resolved against one model, prompt, latent and schedule; checked before any step."""

    concepts: LodaConcepts
    layers: MapLayers
    stage1_steps: int  # N
    total_steps: int  # S; 0 when there is nothing to sample (denoise 0)
    fixing: bool  # p or m non-zero, and steps left after stage 1
    layout: ModelLayout  # the model's layers, built once per run
    token_table: str = ""  # words located by decoded pieces (DiT): word -> token row (piece), shown in the report
    drawn_masks: Optional[torch.Tensor] = None  # (B, K, h, w) bool at the latent grid: the user's masks (user_masks)
    mask_mode: str = "replace"  # how drawn_masks meet LODA's masks: replace or constrain (user_masks.MASK_MODES)


def loda_stage1_steps(config: LodaConfig, total_steps: int) -> int:
    """Check the settings against S = `total_steps` and return N (0 for a run with nothing to sample).

    Raises: ConceptSplitError for a bad setting or N > S (LodaConfig.validate).
    """
    if total_steps == 0:
        config.validate()
        return 0
    config.validate(total_steps)
    return config.loda_steps_for(total_steps)


def plan_loda_run(
    config: LodaConfig, layout: ModelLayout, words, latent_hw: tuple[int, int], total_steps: int, stage1_steps: int
) -> LodaPlan:
    """Resolve concepts, layers and whether fixing runs (method §3.1, §4), from the located concept words `words`
    (concept_words.ConceptWords) and the model's layout.

    Raises: ConceptSplitError for fewer than 2 concepts, a model without map-level layers, or maps smaller than the
    smoothing kernel.
    """
    concepts = LodaConcepts(tuple(words.labels), tuple(words.first_positions), words.prompt_length, words.prompt_ids)
    layers = select_map_layers(layout, latent_hw, config.fixing_layers)
    fixing = (config.boost != 0 or config.suppression != 0) and stage1_steps < total_steps
    return LodaPlan(concepts, layers, stage1_steps, total_steps, fixing, layout, words.token_table)


class MapCollector:
    """Observer that averages the concept columns of the attention probabilities over heads and layers (method §3.1).

    Keeps them in the autograd graph when grad mode is on (stage 1). Per image: rows of each chunk are images.
    """

    def __init__(self, concepts: LodaConcepts, layers: MapLayers):
        self.concepts = concepts
        self.layers = layers
        self.active = False
        self._keys: frozenset = frozenset()
        self._branches: frozenset = frozenset((COND,))
        self._last_key: Optional[LayerKey] = None
        self._truncate = False
        self._first_call = False
        self._sums: Optional[torch.Tensor] = None  # (B_img, K, N) fp32
        self._count = 0
        self._columns: dict = {}  # (T, device) -> (K·copies,) long, the concept columns

    def __deepcopy__(self, memo):  # run state: ComfyUI must never copy it (integration §1.1)
        return self

    def start(
        self, keys: Sequence[LayerKey], branches: Sequence[int], truncate: bool = False, first_call: bool = False
    ) -> None:
        """Collect from `keys` on chunks of `branches`.

        With `truncate`, end the pass after the last key. With `first_call`, keep only the first model call that
        holds each wanted branch and stop collecting after it, so a multi-evaluation step (heun's corrector,
        dpmpp_2s's midpoint) never mixes its later forwards at another sigma into the masks (method §4.1). A branch
        absent from every call (uncond with CFG 1) is simply never collected.
        """
        self.active, self._keys, self._branches = True, frozenset(keys), frozenset(branches)
        self._last_key = tuple(keys)[-1]
        self._truncate, self._first_call = truncate, first_call
        self._sums, self._count = None, 0

    def stop(self) -> None:
        self.active = False
        self._truncate = False

    def maps(self) -> torch.Tensor:
        """Ā[:, :, s_k] per image: shape (B_img, K, h, w) fp32 (differentiable in stage 1).

        Raises: ConceptSplitError when nothing was captured: no model call held the prompt over the whole image.
        """
        if self._sums is None or self._count == 0:
            raise ConceptSplitError.build(
                "LODA found no attention of its prompt at the map level",
                seen=f"no model call with the positive prompt of {', '.join(self.concepts.labels)} on the whole "
                f"{self.layers.grid[0]}×{self.layers.grid[1]} map grid",
                expected="the positive prompt holding the concept words, conditioning the whole image",
                fix="remove area or mask conditioning from that prompt (other prompts may keep theirs)",
            )
        h, w = self.layers.grid
        return (self._sums / self._count).unflatten(-1, (h, w))  # (B_img, K, h, w)

    def attention_bias(self, call: AttentionCall, q, k):
        return None

    def _collected_chunks(self, call: AttentionCall) -> tuple[tuple[int, int], ...]:
        """(chunk index, own length) this collector reads from `call`; () when it is inactive, the layer is not
        wanted, the grid is cropped (an area-conditioned prompt is never the whole-image prompt's) or the call holds
        only other prompts' chunks."""
        if not self.active or call.key not in self._keys or call.grid != self.layers.grid:
            return ()
        return self.concepts.chunks(call, self._branches)

    def needs_probabilities(self, call: AttentionCall) -> bool:
        return bool(self._collected_chunks(call))

    def _concept_columns(self, context_length: int, own_length: int, device) -> torch.Tensor:
        key = (context_length, own_length, device)
        columns = self._columns.get(key)
        if columns is None:  # built once per context length: a host-to-device copy on the GPU
            columns = torch.tensor(self.concepts.columns(context_length, own_length), device=device)  # (K, copies)
            self._columns[key] = columns
        return columns

    def observe_probabilities(self, call: AttentionCall, probs: torch.Tensor) -> None:
        per, heads = call.rows_per_chunk, call.heads
        for chunk, own_length in self._collected_chunks(call):
            columns = self._concept_columns(call.context_length, own_length, probs.device)  # (K, copies)
            rows = probs[chunk * per : (chunk + 1) * per]  # (B_img, H, N, T)
            picked = rows[..., columns.flatten()].unflatten(-1, columns.shape)  # (B_img, H, N, K, copies)
            summed = picked.sum(dim=(-1, 1)).transpose(1, 2)  # (B_img, K, N): copies and heads summed
            self._sums = summed if self._sums is None else self._sums + summed
            self._count += heads

    def after_attention(self, call: AttentionCall) -> None:
        chunks = self._collected_chunks(call) if call.key == self._last_key else ()
        if not chunks:
            return  # a model call holding only other prompts' chunks (or an area crop) neither ends nor truncates
        if self._truncate:
            raise _TruncatedForward()
        if self._first_call:  # the end of a model call: the branches it collected are done (method §4.1)
            done = {call.cond_or_uncond[index] for index, _ in chunks}
            self._branches = self._branches.difference(done)
            if not self._branches:
                self.active = False


class FixingBias:
    """Observer adding the stage-2 logit bias (method §4.3): +p on s_k and m on the other concepts inside mask_k.

    Each image of the batch gets its own masks; masks are nearest-resized to every biased layer's grid.
    """

    def __init__(self, concepts: LodaConcepts, masks: torch.Tensor, config: LodaConfig, layers: MapLayers):
        self.concepts = concepts
        self.masks = masks  # (B_img, K, h, w) bool at the map level
        self.config = config
        self.keys = layers.fixing_keys
        self.branches = (COND, UNCOND) if config.fixing_branches == "both" else (COND,)
        self.active = False
        # (grid, T, dtype, device, cond_or_uncond, rows per chunk) -> (B, N, T): the bias of one call layout, built
        # once per run, so the per-call cost is a dict lookup
        self._cache: dict = {}

    def __deepcopy__(self, memo):
        return self

    def activate(self, masks: torch.Tensor) -> None:
        """Start biasing with `masks` (B_img, K, h, w) bool; drops biases built from earlier masks."""
        self.masks, self.active = masks, True
        self._cache.clear()

    def _chunk_bias(self, call: AttentionCall, own_length: int, dtype: torch.dtype, device) -> torch.Tensor:
        """(rows per chunk, N, T): the bias of one chunk whose conditioning has `own_length` tokens."""
        h, w = call.grid
        columns = self.concepts.columns(call.context_length, own_length)
        per_image = []
        for image_masks in self.masks.to(device):  # (K, h0, w0)
            at_layer = resize_masks_nearest(image_masks, h, w).flatten(1)  # (K, N)
            per_image.append(
                build_fixing_bias(
                    at_layer, columns, call.context_length, self.config.boost, self.config.suppression, dtype
                )
            )  # (N, T)
        images = torch.stack(per_image)  # (B_img, N, T)
        return images[torch.arange(call.rows_per_chunk, device=device) % images.shape[0]]  # rows of a chunk: images

    def _call_bias(self, call: AttentionCall, biased: dict, dtype: torch.dtype, device) -> torch.Tensor:
        chunks = []
        for index in range(len(call.cond_or_uncond)):
            own_length = biased.get(index)
            if own_length is None:  # a branch left unbiased, or another positive prompt of the batch
                chunks.append(
                    torch.zeros(
                        call.rows_per_chunk,
                        call.grid[0] * call.grid[1],
                        call.context_length,
                        dtype=dtype,
                        device=device,
                    )
                )
            else:
                chunks.append(self._chunk_bias(call, own_length, dtype, device))
        return torch.cat(chunks)  # (B, N, T)

    def attention_bias(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.active or (self.keys is not None and call.key not in self.keys):
            return None
        biased = dict(self.concepts.chunks(call, self.branches))  # {chunk index: own length}
        if not biased:
            return None
        key = (
            call.grid,
            call.context_length,
            q.dtype,
            q.device,
            call.cond_or_uncond,
            call.rows_per_chunk,
            tuple(sorted(biased.items())),
        )
        bias = self._cache.get(key)
        if bias is None:
            bias = self._cache[key] = self._call_bias(call, biased, q.dtype, q.device)
        return bias

    def needs_probabilities(self, call: AttentionCall) -> bool:
        return False

    def observe_probabilities(self, call: AttentionCall, probs: torch.Tensor) -> None:
        return None

    def after_attention(self, call: AttentionCall) -> None:
        return None


def build_concept_masks(maps: torch.Tensor, config: LodaConfig) -> torch.Tensor:
    """mask_k per image from the maps of the last completed forward (method §4.1, §4.2).

    Shapes: maps (B_img, K, h, w) any float; returns (B_img, K, h, w) bool.
    """
    return torch.stack([build_fixing_masks(image_maps, config) for image_maps in maps.detach()])


@dataclass(frozen=True)
class StepRecord:
    """One stage-1 latent update of one image (method §3.3)."""

    step: int  # sampling step i (sigma index)
    image: int  # index in the batch
    iteration: int  # inner iteration
    harmonic_mean: float  # HM of the pairwise KLs before the update
    loss: float  # L = max(0, τ − HM)
    eta: float  # η_i
    outcome: str  # "updated", "loss 0, no update", "skipped: non-finite gradient", "skipped: non-finite latent"


def format_report(
    records: Sequence[StepRecord],
    concepts: LodaConcepts,
    stage1_steps: int,
    total_steps: int,
    masks: Optional[torch.Tensor],
    fixing: bool,
) -> str:
    """The node's text output: per-step HM and loss, skipped updates, and the mask sizes (method §3, §4)."""
    named = ", ".join(f"{label} (token {p})" for label, p in zip(concepts.labels, concepts.positions))
    if total_steps == 0:
        return f"LODA: concepts {named}; no sampling steps (denoise 0): the latent is returned unchanged, no masks"
    stage1 = "stage 1 off"
    if stage1_steps:  # the sampler runs step by step there, so multistep history restarts (integration §4.3)
        stage1 = (
            f"stage 1 on steps 0..{stage1_steps - 1} of {total_steps}, one sampler step at a time "
            "(multistep samplers run first-order on those steps)"
        )
    lines = [f"LODA: concepts {named}; {stage1}"]
    for r in records:
        lines.append(
            f"step {r.step} image {r.image} iter {r.iteration}: HM {r.harmonic_mean:.4f} loss "
            f"{r.loss:.4f} eta {r.eta:.2f}: {r.outcome}"
        )
    skipped = sum(r.outcome.startswith("skipped") for r in records)
    if skipped:
        lines.append(f"{skipped} update(s) skipped because of non-finite values")
    if fixing and masks is not None:
        sizes = masks.flatten(2).sum(-1).tolist()  # (B_img, K) pixels per mask
        lines.append(
            f"attention fixing from step {stage1_steps}: mask pixels per image and concept {sizes} "
            f"of {masks.shape[-2]}×{masks.shape[-1]}"
        )
    else:
        lines.append("attention fixing off (p = m = 0, or no steps left after stage 1)")
    return "\n".join(lines)
