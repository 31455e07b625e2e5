"""Capture the cross-attention maps of chosen words during any sampling run, for the Attention Map Viewer (issue 4).

The captured map of word k for image b is method §3.1's Ā[:, :, s] extended over steps:

    M[b, k] = mean over (model calls in the step range) × (chosen attn2 layers) × (heads) of
              Σ_{s ∈ positions(k)} softmax(Q Kᵀ / √D)[b, :, s]            reshaped to (h, w)

on the positive (cond) branch only, with every key column raw (SOT included, no re-softmax), as method §3.1. Running
sums are kept per recorded step and layer grid, for the interactive viewer's step slider (issue 15), and the whole
range's map is their sum: O(K × S × h × w) per image (step_maps_bytes states the bound), never per layer or head.
Layers with coarser grids are upsampled bilinearly to the finest chosen grid when the run ends; since that is linear,
each (call, layer) map still counts as one uniform vote.

Rules (documented choices):
- A word of several BPE tokens sums its tokens' columns in "all tokens" mode (the probability of attending to any of
  them), or uses its first token (method §2.4) in "first token" mode.
- LCM-repeated contexts (integration §1.6: a cond shorter than the uncond is tiled to the common length) sum the
  copies of
  each column. The copies have identical keys, so their sum equals the probability without the repeat.
- Several positive chunks in one call (ConditioningCombine) are averaged.
- Only sampling steps count. The seam brackets every model call with begin_model_call(σ) / end_model_call, reading σ
  once per model call (one host sync on a GPU, not one per attn2 layer); it passes None for passes that are not part
  of the sampling trajectory: calls made with gradients on (LODA's optimisation passes) and calls marked as
  auxiliary (LODA's no-grad mask pass at σ0 when stage 1 is off). Those are skipped.
- A model call at sigma σ belongs to step i when sample_sigmas[i] ≥ σ > sample_sigmas[i+1]: second-order samplers'
  extra calls count toward their step, each call one vote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from .attention_calls import COND, AttentionCall
from .attention_record import ConceptMaps
from .concept_words import TOKEN_FIRST, TOKEN_MODES  # noqa: F401 (the node lists TOKEN_MODES)
from .errors import ConceptSplitError
from .model_layout import LayerKey, ModelLayout
from .widgets import WidgetRange

LAYERS_BLOCKS = "blocks"
# "latent/N": the layers whose grid is the latent's divided by N (ceil at each halving); latent/4 is LODA's level.
LAYER_CHOICES = ("latent/4", "all", "latent", "latent/2", "latent/8", LAYERS_BLOCKS)
_SIGMA_TOLERANCE = 1e-5  # relative; a call's sigma is the schedule's own value, so only float noise is tolerated
# A typed layer name: "<block name> <id>.<depth>", e.g. "input 7", "middle", "output_3.1" (UNet) or "double 3" (DiT);
# the names are those of the model's own layer keys (name, id, depth).
_BLOCK_PATTERN = re.compile(r"^([a-z]+)(?:[\s_]*(\d+))?(?:\.(\d+))?$")


@dataclass(frozen=True)
class CaptureDefaults:
    """Widget defaults of the Capture Attention node (issue 4)."""

    token_mode: str = TOKEN_FIRST  # the token ToVA and LODA use (method §2.4)
    layers: str = "latent/4"  # LODA's map level (method §3.1); "all" shows detail, latent/8 the layout
    first_step: int = 0  # 0-based, inclusive
    last_step: int = -1  # inclusive; -1 = the run's last step
    kept_runs: int = 8  # finished runs remembered per capture (a few KB each), for graphs with several samplers


CAPTURE_DEFAULTS = CaptureDefaults()
MAX_STEP = 10000  # the largest step number the step widgets take
UI_RANGES: dict[str, WidgetRange] = {
    "first_step": WidgetRange(0, MAX_STEP, 1),
    "last_step": WidgetRange(-1, MAX_STEP, 1),
}


@dataclass(frozen=True)
class CaptureRequest:
    """What one Capture Attention node records."""

    labels: tuple[str, ...]  # K words, as typed
    token_positions: tuple[tuple[int, ...], ...]  # per word: its positions in the positive prompt
    prompt_length: int  # T of the positive prompt (77 · windows) the positions refer to
    layer_keys: frozenset  # attn2 block keys (name, id, depth) to average over
    first_step: int = CAPTURE_DEFAULTS.first_step
    last_step: int = CAPTURE_DEFAULTS.last_step
    prompt_ids: tuple | None = None  # the positive prompt's token ids: other positives in a batch are skipped
    prompt_text: str = ""  # the positive prompt's text, for the viewer's word strip ("" = unknown)

    def prompt_chunks(self, call: AttentionCall) -> tuple[tuple[int, ...], int]:
        """(indices, own length): the whole-image positive chunks of `call` that hold this prompt and have the first
        such chunk's own token length (attention_calls.AttentionCall.prompt_chunks), so one column matrix fits them
        all; ((), prompt length) when the call holds none."""
        chunks = call.prompt_chunks((COND,), self.prompt_ids, self.prompt_length)
        if not chunks:
            return (), self.prompt_length
        own = chunks[0][1]
        return tuple(index for index, length in chunks if length == own), own

    def __post_init__(self) -> None:
        assert len(self.labels) == len(self.token_positions) > 0, "one position tuple per word"
        assert all(0 <= p < self.prompt_length for ps in self.token_positions for p in ps), "positions in prompt"


def select_layers(levels: Mapping[LayerKey, int], choice: str, blocks: str = "") -> frozenset:
    """Resolve a layer choice against the model's attn2 layers and their downsampling levels.

    Args:
        levels: {block key: level}; a layer at level l has the grid ceil(latent / 2^l).
        choice: "all", "latent", "latent/N" (N a power of 2), or "blocks" to read `blocks`.
        blocks: comma-separated ComfyUI block names, e.g. "input 7, middle, output 3.0" (".d" = depth index d).
    Raises: ConceptSplitError when the model has no such layer, or the choice cannot be read.
    """
    if choice == "all":
        return frozenset(levels)
    if choice == LAYERS_BLOCKS:
        return _parse_blocks(levels, blocks)
    match = re.fullmatch(r"latent(?:/(\d+))?", choice)
    factor = int(match.group(1) or 1) if match else 0
    if factor < 1 or factor & (factor - 1):
        raise ConceptSplitError.build(
            "Unknown layer choice",
            seen=repr(choice),
            expected=", ".join(LAYER_CHOICES),
            fix="pick a choice from the list",
        )
    keys = frozenset(key for key, level in levels.items() if 2**level == factor)
    if not keys:
        have = ", ".join(_level_name(level) for level in sorted(set(levels.values())))
        raise ConceptSplitError.build(
            f"This model has no cross-attention layer at {choice}",
            seen=f"attn2 layers at {have}",
            expected=f"one of: all, {have}, or blocks",
            fix=f"pick one of {have}, or all",
        )
    return keys


def select_layout_layers(layout: ModelLayout, choice: str, blocks: str = "") -> frozenset:
    """`select_layers` on a model's layout. In a joint layout (a DiT: every block has the patch grid, so a latent
    level cannot tell blocks apart) a latent-level choice means the layout's map layers, LODA's."""
    if layout.joint and choice not in ("all", LAYERS_BLOCKS):
        return layout.map_keys()
    return select_layers(layout.levels(), choice, blocks)


def _level_name(level: int) -> str:
    return "latent" if level == 0 else f"latent/{2**level}"


def _parse_blocks(levels: Mapping[LayerKey, int], blocks: str) -> frozenset:
    keys: set[LayerKey] = set()
    for item in (part.strip().lower() for part in blocks.split(",")):
        if not item:
            continue
        match = _BLOCK_PATTERN.match(item)
        chosen = set()
        if match:
            name, number, depth = match.group(1), int(match.group(2) or 0), match.group(3)
            chosen = {key for key in levels if key[:2] == (name, number) and (depth is None or key[2] == int(depth))}
        if not chosen:
            raise ConceptSplitError.build(
                f'This model has no cross-attention block "{item}"',
                seen=f"its attn2 blocks: {_blocks_text(levels)}",
                expected='comma-separated names like "input 7, middle, output 3" (".d" picks depth d)',
                fix="type blocks from that list, or pick a latent level",
            )
        keys |= chosen
    if not keys:
        raise ConceptSplitError.build(
            'Layer choice "blocks" needs block names',
            seen="an empty blocks field",
            expected=f"some of: {_blocks_text(levels)}",
            fix='type e.g. "input 7, output 3", or pick a latent level',
        )
    return frozenset(keys)


def _blocks_text(levels: Mapping[LayerKey, int]) -> str:
    names: dict[str, list[str]] = {}
    for name, number, depth in sorted(levels):  # by name, id, depth (for a UNet: input, middle, output)
        label = str(number) if depth == 0 else f"{number}.{depth}"
        names.setdefault(name, []).append(label)
    return "; ".join(f"{name} {', '.join(labels)}" for name, labels in names.items())


def step_index(sigma: float, sample_sigmas: torch.Tensor) -> int:
    """0-based step of a model call at `sigma`: the last i with sample_sigmas[i] ≥ σ (a decreasing schedule).

    Shapes: sample_sigmas (S + 1,) — S steps and the final sigma.
    """
    reached = sample_sigmas[:-1] >= sigma * (1.0 - _SIGMA_TOLERANCE)  # (S,)
    return max(int(reached.sum().item()) - 1, 0)


def word_columns(request: CaptureRequest, context_length: int, own_length: int | None = None) -> torch.Tensor:
    """Which key columns belong to which word: a 0/1 matrix over the T columns of a text context.

    `own_length` is the length of the conditioning in the chunk (default the prompt's; longer when ConditioningConcat
    appended text): its LCM copies repeat every `own_length` columns.
    Shapes: returns (T, K) fp32 on the CPU, T = context_length = copies · own_length (LCM copies all count).
    Raises: ConceptSplitError when T is not a multiple of that length (another prompt was sampled).
    """
    T, stride = context_length, own_length or request.prompt_length
    copies, rest = divmod(T, stride)
    if rest or copies == 0:
        raise ConceptSplitError.build(
            "The sampled prompt is not the one Capture Attention located the words in",
            seen=f"a text context of {T} tokens",
            expected=f"a multiple of {stride} tokens",
            fix="connect the same positive conditioning to Capture Attention and to the sampler",
        )
    assign = torch.zeros(T, len(request.labels))  # (T, K)
    for k, positions in enumerate(request.token_positions):
        for position in positions:
            assign[position::stride, k] = 1.0  # the word's column in every copy
    return assign


def call_concept_maps(
    probs: torch.Tensor,
    call: AttentionCall,
    request: CaptureRequest,
    columns: torch.Tensor | None = None,
    chunks: tuple | None = None,
) -> torch.Tensor:
    """One attn2 call's per-word maps: rows of the positive chunks holding the prompt (at least one; other positive
    prompts of the batch are skipped), heads averaged, word columns (and LCM copies) summed.

    `columns` is word_columns(request, T, own length) already on probs' device (AttentionCapture caches it: building
    it per call would copy to the device, a host sync, at every layer); `chunks` is request.prompt_chunks(call) when
    the caller has it. Only slicing and matmuls here: no host sync.
    Shapes: probs (B, H, N, T) fp32, N = h·w, T = copies · prompt_length -> (B_img, K, h, w), B_img = rows per chunk.
    Raises: ConceptSplitError when T is not a multiple of the captured prompt's length (another prompt was sampled).
    """
    B, H, N, T = probs.shape
    h, w = call.grid
    indices, own_length = chunks if chunks is not None else request.prompt_chunks(call)
    if columns is None:
        columns = word_columns(request, T, own_length).to(probs.device)
    per = call.rows_per_chunk
    cond = [probs[i * per : (i + 1) * per] for i in indices]  # views, no copy
    per_word = torch.stack(cond) @ columns.to(probs.dtype)  # (C, B_img, H, N, T) x (T, K) -> (C, B_img, H, N, K)
    per_word = rearrange(per_word.mean(dim=2), "c b (h w) k -> c b k h w", h=h, w=w)  # heads averaged
    return per_word.mean(dim=0)  # (B_img, K, h, w), positive chunks averaged


class _RunSums:
    """Running sums of one sampling run: per step and layer grid, Σ maps (B_img, K, h, w) and the number added."""

    def __init__(self, sample_sigmas: torch.Tensor, first_step: int, last_step: int):
        self.sample_sigmas = sample_sigmas  # (S + 1,) fp32, CPU
        self.first_step, self.last_step = first_step, last_step
        self.step_sums: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}  # (step, grid) -> Σ maps
        self.step_counts: dict[tuple[int, tuple[int, int]], int] = {}
        self.steps: set[int] = set()
        self.layers: set[LayerKey] = set()

    def add(self, key: LayerKey, step: int, maps: torch.Tensor) -> None:
        grid = tuple(maps.shape[-2:])
        slot = (step, grid)  # one sum per step and grid: K × h × w per image; the whole range is their sum
        if slot in self.step_sums:
            self.step_sums[slot] += maps
        else:
            self.step_sums[slot] = maps.clone()
        self.step_counts[slot] = self.step_counts.get(slot, 0) + 1
        self.steps.add(step)
        self.layers.add(key)

    def result(self, labels: tuple[str, ...], prompt: str = "") -> ConceptMaps | None:
        """Mean over every added map, coarser grids upsampled (bilinear) to the finest; the same per recorded step.

        Maps (B_img, K, h, w) and step maps (B_img, S_rec, K, h, w), fp32 on the CPU.
        """
        if not self.step_sums:
            return None
        target = max((grid for _, grid in self.step_sums), key=lambda grid: grid[0] * grid[1])
        steps = tuple(sorted(self.steps))
        totals, weights = [], []
        for step in steps:
            sums = {grid: summed for (s, grid), summed in self.step_sums.items() if s == step}
            totals.append(_upsampled_total(sums, target))  # (B_img, K, h, w), Σ over this step's maps
            weights.append(sum(n for (s, _), n in self.step_counts.items() if s == step))
        maps = (sum(totals) / sum(weights)).float().cpu()  # (B_img, K, h, w): the mean over every added map
        per_step = [(total / count).float().cpu() for total, count in zip(totals, weights)]
        layers = tuple(sorted(self.layers))  # by name, id, depth (for a UNet: input, middle, output)
        return ConceptMaps(
            labels=labels,
            maps=maps,
            steps=steps,
            layers=layers,
            step_maps=torch.stack(per_step, dim=1),
            step_weights=tuple(weights),  # (B, S_rec, K, h, w)
            total_steps=int(self.sample_sigmas.shape[0]) - 1,
            prompt=prompt,
        )


def _upsampled_total(sums: Mapping[tuple[int, int], torch.Tensor], target: tuple[int, int]) -> torch.Tensor:
    """Σ over grids of the summed maps, each upsampled bilinearly to `target`. Shapes: (B, K, h_g, w_g) -> (B, K, h, w).

    Upsampling is linear, so upsampling a sum equals summing the upsampled maps: each (call, layer) map is one vote.
    """
    total = None
    for grid, summed in sums.items():
        if grid != tuple(target):
            summed = F.interpolate(summed, size=target, mode="bilinear", align_corners=False)
        total = summed if total is None else total + summed
    return total


def step_maps_bytes(batch: int, words: int, steps: int, grids: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Memory of the per-step maps of one run (fp32), as the README states it: (during the run, kept after it).

    During the run: batch × words × steps × Σ_grids h·w × 4 bytes (one sum per step and layer grid, on the model's
    device); kept: batch × steps × words × h·w × 4 bytes at the finest grid (CPU), for each of the last kept_runs
    runs. The whole range's map is derived from these sums when the run ends; no second set is kept.
    """
    finest = max(h * w for h, w in grids)
    return batch * words * steps * sum(h * w for h, w in grids) * 4, batch * steps * words * finest * 4


class AttentionCapture:
    """The capture observer (attention_calls.AttentionObserver) plus the results of the runs it saw.

    The seam calls start_run(sample_sigmas) before and finish_run(output latent) after each sampling run with the
    patched model, and begin_model_call / end_model_call around each model call; the viewer asks maps_for(latent).
    `__deepcopy__` returns self: ComfyUI deep-copies model_options on every clone() and the results must stay in
    this one object (integration §1.1).
    """

    def __init__(self, request: CaptureRequest, kept_runs: int = CAPTURE_DEFAULTS.kept_runs):
        self.request = request
        self.kept_runs = kept_runs
        self._run: _RunSums | None = None
        self._call_step: int | None = None  # step of the model call in progress; None = not recorded
        self._columns: dict[tuple, torch.Tensor] = {}  # word_columns per (T, own length, device)
        self._finished: list[tuple[torch.Tensor, ConceptMaps | None]] = []  # (output latent on CPU, maps), oldest first

    def __deepcopy__(self, memo):
        return self

    # -- run lifecycle -------------------------------------------------------------------------------------------
    def start_run(self, sample_sigmas: torch.Tensor) -> None:
        """Begin a run over `sample_sigmas` (S + 1,). Raises: ConceptSplitError when the step range is outside it."""
        steps = int(sample_sigmas.shape[0]) - 1
        first, last = self.request.first_step, self.request.last_step
        last = steps - 1 if last == -1 else last
        if first >= steps or last >= steps:
            raise ConceptSplitError.build(
                "Capture Attention's step range is outside the sampling run",
                seen=f"steps {first} to {self.request.last_step} for a run of {steps} steps (0 to {steps - 1})",
                expected=f"first_step and last_step between 0 and {steps - 1} (last_step -1 = the last step)",
                fix="lower the step range, or raise the sampler's steps",
            )
        self._run = _RunSums(sample_sigmas.detach().float().cpu(), first, last)

    def finish_run(self, output: torch.Tensor) -> None:
        """End the run; remember its maps with the sampler's output latent (B_img, 4, h, w), which identifies it."""
        run, self._run = self._run, None
        if run is None:
            return
        self._finished.append(
            (output.detach().float().cpu().clone(), run.result(self.request.labels, self.request.prompt_text))
        )
        del self._finished[: -self.kept_runs]

    def abort_run(self) -> None:
        self._run = None

    @property
    def running(self) -> bool:
        """Whether a run is in progress (the seam reads a model call's sigma only then)."""
        return self._run is not None

    # -- model calls: the step is found once per model call, not once per attn2 layer --------------------------------
    def begin_model_call(self, sigma: float | None) -> int | None:
        """A model call at `sigma` starts; None marks a pass that is not a sampling step (gradient or auxiliary pass).

        Returns the previous call state, to hand back to end_model_call.
        """
        previous, run = self._call_step, self._run
        step = None if run is None or sigma is None else step_index(sigma, run.sample_sigmas)
        self._call_step = step if step is not None and run.first_step <= step <= run.last_step else None
        return previous

    def end_model_call(self, previous: int | None) -> None:
        self._call_step = previous

    # -- AttentionObserver -----------------------------------------------------------------------------------------
    def attention_bias(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor) -> None:
        return None

    def needs_probabilities(self, call: AttentionCall) -> bool:
        return self._step_of(call) is not None

    def observe_probabilities(self, call: AttentionCall, probs: torch.Tensor) -> None:
        step = self._step_of(call)  # checked again: another observer may have asked for these probabilities
        if step is not None:
            chunks = self.request.prompt_chunks(call)
            key = (call.context_length, chunks[1], probs.device)
            columns = self._columns.get(key)
            if columns is None:  # once per context length and device: the only device copy of the run
                columns = word_columns(self.request, key[0], key[1]).to(probs.device)
                self._columns[key] = columns
            self._run.add(call.key, step, call_concept_maps(probs.detach(), call, self.request, columns, chunks))

    def after_attention(self, call: AttentionCall) -> None:
        return None

    def _step_of(self, call: AttentionCall) -> int | None:
        # No tensor is read here: this runs for every attn2 call and must not force a host sync.
        if self._call_step is None or self._run is None:
            return None
        if call.key not in self.request.layer_keys or not self.request.prompt_chunks(call)[0]:
            return None
        return self._call_step

    # -- results ---------------------------------------------------------------------------------------------------
    def maps_for(self, samples: torch.Tensor | None = None) -> ConceptMaps:
        """The maps of the run whose output is `samples` (B_img, 4, h, w), or of the latest run when None.

        Raises: ConceptSplitError when no run finished, none produced `samples`, or nothing was recorded.
        """
        if not self._finished:
            raise ConceptSplitError.build(
                "No attention was captured yet",
                seen="no finished sampling run with Capture Attention's model",
                expected="the viewer to run after a sampler that uses the MODEL output of Capture Attention",
                fix="connect that sampler's LATENT (or the decoded IMAGE) to the viewer",
            )
        if samples is None:
            _, maps = self._finished[-1]
        else:
            wanted = samples.detach().float().cpu()
            matches = [
                maps for output, maps in self._finished if output.shape == wanted.shape and torch.equal(output, wanted)
            ]
            if not matches:
                raise ConceptSplitError.build(
                    "The LATENT was not sampled with this Capture Attention's model",
                    seen=f"a latent of shape {tuple(wanted.shape)} that none of the last {len(self._finished)} "
                    "captured runs produced",
                    expected="the LATENT output of the sampler that uses Capture Attention's MODEL",
                    fix="connect that sampler's LATENT directly (not an upscaled or edited one), or the IMAGE only",
                )
            maps = matches[-1]
        if maps is None:
            raise ConceptSplitError.build(
                "The sampling run recorded no attention for the chosen steps and layers",
                seen=f"steps {self.request.first_step} to {self.request.last_step}, "
                f"{len(self.request.layer_keys)} layer(s), no positive-prompt call among them",
                expected="at least one model call with the positive prompt in the step range",
                fix="widen the step range or the layers",
            )
        return maps


def describe_coverage(record: ConceptMaps) -> str:
    """One line naming what the maps average over, for the viewer's report."""
    B, K, h, w = record.maps.shape
    parts = [f"{B} image(s), {K} word(s), {h}x{w} grid"]
    if record.steps:
        parts.append(f"steps {record.steps[0]}-{record.steps[-1]} ({len(record.steps)} steps)")
    if record.layers:
        parts.append(f"{len(record.layers)} attn2 layer(s)")
    return "Maps: " + ", ".join(parts) + ", heads averaged."
