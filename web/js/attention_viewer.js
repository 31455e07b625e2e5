// ConceptSplit: the interactive Attention Map Viewer (issue 15). Plain JS, no build step, no dependencies.
//
// Shown on the "Attention Map Viewer" node (ConceptSplitAttentionViewer) after a run: the decoded image with one
// word's heatmap over it, the prompt's words (hover or click a tracked word to switch), a step range (the maps of
// those sampling steps, weighted as the capture averaged them), LODA's stage-1 steps and mask step marked, masks on
// and off, opacity and colormap, and per-word entropy / per-pair KL and overlap of the shown range.
//
// Data: the node's UI output key "conceptsplit_viewer" (conceptsplit_core/viewer_payload.py documents the layout),
// received with the "executed" message or, after a page reload, read back from ComfyUI's own /history. Images come
// from ComfyUI's temp folder through /view. Every payload is validated; a bad one shows a message in the widget and
// never throws into the canvas or other nodes.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "ConceptSplitAttentionViewer";
const KEY = "conceptsplit_viewer";
const WIDGET_NAME = "conceptsplit_attention_viewer";
const VERSION = 1;
const EPSILON = 1e-10; // map_metrics.EPSILON: added after sum-normalising (method §3.2)
const MAP_ONLY_LONG_SIDE = 256; // map_render._MAP_ONLY_LONG_SIDE: tile size without an image
const MAX_GRID = 1 << 20; // h·w bound for a payload (a 1024×1024 map grid)
const MIN_HEIGHT = 470;
const HISTORY_ITEMS = 64;
const NIL_UUID = "00000000-0000-0000-0000-000000000000"; // a graph without an id of its own
const EMPTY_TEXT = "No run shown yet. Queue the workflow: the decoded image with one word's attention map " +
    "appears here.";

class ViewerDataError extends Error {}

function fail(message) {
    throw new ViewerDataError(message);
}

function isInt(value, min = 0) {
    return Number.isInteger(value) && value >= min;
}

function base64Bytes(text, what) {
    if (typeof text !== "string") fail(`${what} is not a base64 string`);
    let binary;
    try {
        binary = atob(text);
    } catch (error) {
        fail(`${what} is not valid base64`);
    }
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
}

function base64Float32(text, count, what) {
    const bytes = base64Bytes(text, what);
    if (bytes.length !== count * 4) fail(`${what} holds ${bytes.length / 4} numbers, expected ${count}`);
    const view = new DataView(bytes.buffer);
    const out = new Float32Array(count);
    for (let i = 0; i < count; i++) {
        const value = view.getFloat32(4 * i, true); // little-endian, as viewer_payload.encode_f32 writes
        if (!Number.isFinite(value)) fail(`${what} has a non-finite value at ${i}`);
        out[i] = value;
    }
    return out;
}

/** Validate the node's UI output; return the viewer's data or throw ViewerDataError with a readable reason. */
export function parsePayload(raw) {
    const payload = Array.isArray(raw) ? raw[0] : raw;
    if (payload === undefined || payload === null) fail("the node sent no viewer data");
    if (typeof payload !== "object") fail("the viewer data is not an object");
    if (payload.version !== VERSION) fail(`unknown viewer data version ${JSON.stringify(payload.version)}`);
    const labels = payload.labels;
    if (!Array.isArray(labels) || labels.length === 0 || !labels.every((l) => typeof l === "string")) {
        fail("labels must be a non-empty list of words");
    }
    const K = labels.length;
    const grid = payload.grid;
    if (!Array.isArray(grid) || grid.length !== 2 || !isInt(grid[0], 1) || !isInt(grid[1], 1) ||
        grid[0] * grid[1] > MAX_GRID) fail("grid must be [h, w] of positive integers");
    const [h, w] = grid;
    const steps = payload.steps, weights = payload.step_weights;
    if (!Array.isArray(steps) || steps.length === 0 || !steps.every((s) => isInt(s))) {
        fail("steps must be a non-empty list of step numbers");
    }
    if (!Array.isArray(weights) || weights.length !== steps.length || !weights.every((n) => isInt(n, 1))) {
        fail("step_weights must hold one positive count per step");
    }
    const S = steps.length;
    if (!Array.isArray(payload.maps) || payload.maps.length === 0) fail("maps must hold one entry per image");
    const B = payload.maps.length;
    const maps = payload.maps.map((text, b) => {
        const values = base64Float32(text, S * K * h * w, `maps of image ${b + 1}`);
        if (values.some((v) => v < 0)) fail(`maps of image ${b + 1} have negative attention`);
        return values;
    });
    const images = payload.images;
    if (!Array.isArray(images) || images.length !== B) fail("images must hold one entry (or null) per image");
    images.forEach((ref, b) => {
        if (ref === null) return;
        if (typeof ref !== "object" || typeof ref.filename !== "string" || typeof (ref.subfolder ?? "") !== "string" ||
            typeof ref.type !== "string" || !isInt(ref.width, 1) || !isInt(ref.height, 1)) {
            fail(`image ${b + 1} is not a {filename, subfolder, type, width, height} reference`);
        }
    });
    let masks = null;
    if (payload.masks !== null && payload.masks !== undefined) {
        if (!Array.isArray(payload.masks) || payload.masks.length !== B) fail("masks must hold one entry per image");
        masks = payload.masks.map((text, b) => {
            const bytes = base64Bytes(text, `masks of image ${b + 1}`);
            if (bytes.length !== K * h * w) fail(`masks of image ${b + 1} hold ${bytes.length} cells, expected ${K * h * w}`);
            return bytes;
        });
    }
    const luts = {};
    if (!payload.luts || typeof payload.luts !== "object") fail("luts (colormaps) are missing");
    for (const [name, text] of Object.entries(payload.luts)) {
        const lut = base64Float32(text, 256 * 3, `colormap ${name}`);
        if (lut.some((v) => v < 0 || v > 1)) fail(`colormap ${name} has values outside 0..1`);
        luts[name] = lut;
    }
    if (Object.keys(luts).length === 0) fail("no colormap was sent");
    let words = payload.words;
    if (!Array.isArray(words) || !words.every((t) => t && typeof t.text === "string" && Number.isInteger(t.word) &&
        t.word >= -1 && t.word < K)) {
        words = labels.map((text, k) => ({ text, word: k }));
    }
    const optionalStep = (value, what) => {
        if (value === null || value === undefined) return null;
        if (!isInt(value)) fail(`${what} must be a step number or null`);
        return value;
    };
    const alpha = typeof payload.alpha === "number" && payload.alpha >= 0 && payload.alpha <= 1 ? payload.alpha : 0.5;
    const colormap = payload.colormap in luts ? payload.colormap : Object.keys(luts)[0];
    return {
        labels, K, h, w, steps, weights, S, B, maps, images, masks, luts, words, alpha, colormap,
        totalSteps: isInt(payload.total_steps) ? payload.total_steps : 0,
        stage1Steps: optionalStep(payload.stage1_steps, "stage1_steps"),
        maskStep: optionalStep(payload.mask_step, "mask_step"),
    };
}

/** Weighted mean of slider entries first..last of image b: (K·h·w) float64, as viewer_payload.range_mean. */
export function rangeMean(data, b, first, last) {
    const size = data.K * data.h * data.w;
    const out = new Float64Array(size);
    let total = 0;
    for (let s = first; s <= last; s++) {
        const weight = data.weights[s];
        const offset = s * size;
        const maps = data.maps[b];
        for (let i = 0; i < size; i++) out[i] += weight * maps[offset + i];
        total += weight;
    }
    for (let i = 0; i < size; i++) out[i] /= total;
    return out;
}

/** Min-max to 0..1 (map_render.normalize_for_display); a constant map becomes zeros. */
function normalise(map) {
    let low = Infinity, high = -Infinity;
    for (const v of map) { if (v < low) low = v; if (v > high) high = v; }
    const span = high - low;
    return map.map((v) => (span > 0 ? (v - low) / span : 0));
}

/** Bilinear resize with align_corners=False (torch.nn.functional.interpolate), clamped to 0..1. */
function upsample(map, h, w, H, W) {
    const out = new Float64Array(H * W);
    const sy = h / H, sx = w / W;
    for (let y = 0; y < H; y++) {
        const fy = Math.max((y + 0.5) * sy - 0.5, 0);
        const y0 = Math.min(Math.floor(fy), h - 1), y1 = Math.min(y0 + 1, h - 1), ly = fy - y0;
        for (let x = 0; x < W; x++) {
            const fx = Math.max((x + 0.5) * sx - 0.5, 0);
            const x0 = Math.min(Math.floor(fx), w - 1), x1 = Math.min(x0 + 1, w - 1), lx = fx - x0;
            const top = map[y0 * w + x0] * (1 - lx) + map[y0 * w + x1] * lx;
            const bottom = map[y1 * w + x0] * (1 - lx) + map[y1 * w + x1] * lx;
            out[y * W + x] = Math.min(Math.max(top * (1 - ly) + bottom * ly, 0), 1);
        }
    }
    return out;
}

function roundHalfEven(v) { // torch.round
    const r = Math.round(v);
    return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** Entropy per word, KL a->b and overlap per pair of the maps (map_metrics.entropy / pairwise_kl_matrix / overlap). */
export function metrics(maps, K, N) {
    const P = [], p = [];
    for (let k = 0; k < K; k++) {
        let sum = 0;
        for (let i = 0; i < N; i++) sum += maps[k * N + i];
        const row = new Float64Array(N), raw = new Float64Array(N);
        for (let i = 0; i < N; i++) { raw[i] = sum > 0 ? maps[k * N + i] / sum : 0; row[i] = raw[i] + EPSILON; }
        P.push(row); p.push(raw);
    }
    const entropy = P.map((row) => -row.reduce((acc, v) => acc + v * Math.log(v), 0));
    const pairs = [];
    for (let a = 0; a < K; a++) {
        for (let b = a + 1; b < K; b++) {
            let ab = 0, ba = 0, shared = 0;
            for (let i = 0; i < N; i++) {
                const la = Math.log(P[a][i]), lb = Math.log(P[b][i]);
                ab += P[a][i] * (la - lb); ba += P[b][i] * (lb - la); shared += Math.min(p[a][i], p[b][i]);
            }
            pairs.push({ a, b, kl_ab: ab, kl_ba: ba, overlap: shared });
        }
    }
    return { entropy, pairs };
}

function element(tag, attributes = {}, text = "") {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) el.setAttribute(name, value);
    if (text) el.textContent = text;
    return el;
}

const STYLE = `
.cs-viewer { display: flex; flex-direction: column; gap: 4px; font: 12px sans-serif; color: #ddd;
  box-sizing: border-box; padding: 2px; overflow: hidden; }
.cs-viewer canvas { width: 100%; height: auto; image-rendering: auto; background: #1a1a1a; min-height: 0;
  object-fit: contain; max-height: 60%; }
.cs-viewer .cs-message { color: #ddd; background: #333; padding: 6px; border-radius: 4px; white-space: pre-wrap; }
.cs-viewer .cs-message.cs-error { color: #fbb; background: #522; }
.cs-viewer .cs-words { display: flex; flex-wrap: wrap; gap: 3px; }
.cs-viewer .cs-word { padding: 1px 4px; border-radius: 3px; color: #999; }
.cs-viewer .cs-word.cs-tracked { color: #fff; background: #345; cursor: pointer; }
.cs-viewer .cs-word.cs-active { background: #c60; }
.cs-viewer .cs-row { display: flex; align-items: center; gap: 6px; }
.cs-viewer .cs-row input[type=range] { flex: 1; min-width: 40px; }
.cs-viewer .cs-marks { display: flex; height: 8px; gap: 1px; }
.cs-viewer .cs-marks span { flex: 1; background: #444; }
.cs-viewer .cs-marks span.cs-stage1 { background: #2a6; }
.cs-viewer .cs-marks span.cs-mask { background: #e33; }
.cs-viewer .cs-marks span.cs-shown { outline: 1px solid #fff; }
.cs-viewer table { border-collapse: collapse; font-family: monospace; font-size: 11px; }
.cs-viewer td, .cs-viewer th { padding: 0 6px 0 0; text-align: right; }
.cs-viewer td:first-child, .cs-viewer th:first-child { text-align: left; }
`;

function ensureStyle() {
    if (document.getElementById("conceptsplit-viewer-style")) return;
    const style = element("style", { id: "conceptsplit-viewer-style" });
    style.textContent = STYLE;
    document.head.appendChild(style);
}

/** The widget's DOM and state; every entry point catches its own errors and shows them in the widget. */
class AttentionViewer {
    constructor(node) {
        this.node = node;
        this.data = null;
        this.state = { b: 0, word: 0, hover: null, first: 0, last: 0, alpha: 0.5, colormap: null, masks: false };
        this.pixels = []; // per image: Uint8ClampedArray RGBA of the decoded image, or null
        this.root = element("div", { class: "cs-viewer", "data-cs": "viewer" });
        this.message = element("div", { class: "cs-message", "data-cs": "message" }, EMPTY_TEXT);
        this.body = element("div", { "data-cs": "body" });
        this.body.style.display = "none";
        this.root.append(this.message, this.body);
        this.root.dataset.status = "message";
        this.root.addEventListener("pointerdown", (event) => event.stopPropagation()); // the canvas must not drag
    }

    showMessage(text, isError = false) {
        this.message.textContent = text;
        this.message.classList.toggle("cs-error", isError);
        this.message.style.display = "";
        this.root.dataset.status = isError ? "error" : "message";
    }

    setPayload(raw) {
        try {
            const data = parsePayload(raw);
            this.data = data;
            this.state = { b: 0, word: 0, hover: null, first: 0, last: data.S - 1, alpha: data.alpha,
                           colormap: data.colormap, masks: false };
            this.pixels = new Array(data.B).fill(null);
            this.build();
            this.root.dataset.status = "loading";
            this.loadImages().then(() => this.draw(), (error) => this.report(error));
        } catch (error) {
            this.data = null;
            this.body.style.display = "none";
            const reason = error instanceof ViewerDataError ? error.message : String(error);
            this.showMessage(`Attention viewer: cannot show this run (${reason}). Queue the workflow again.`, true);
            if (!(error instanceof ViewerDataError)) console.warn("[ConceptSplit] attention viewer:", error);
        }
    }

    report(error) {
        this.showMessage(`Attention viewer: ${error instanceof Error ? error.message : String(error)}`, true);
    }

    async loadImages() {
        const data = this.data;
        await Promise.all(data.images.map(async (ref, b) => {
            if (ref === null) return;
            const params = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "",
                                                 type: ref.type });
            const image = new Image();
            image.src = api.apiURL(`/view?${params}`);
            await image.decode().catch(() => fail(`image ${b + 1} (${ref.filename}) could not be loaded`));
            if (data !== this.data) return;
            const canvas = element("canvas");
            canvas.width = ref.width; canvas.height = ref.height;
            const context = canvas.getContext("2d");
            context.drawImage(image, 0, 0, ref.width, ref.height);
            this.pixels[b] = context.getImageData(0, 0, ref.width, ref.height).data;
        }));
    }

    build() {
        const data = this.data, state = this.state;
        this.body.replaceChildren();
        this.canvas = element("canvas", { "data-cs": "overlay" });
        this.words = element("div", { class: "cs-words", "data-cs": "words" });
        data.words.forEach((token) => {
            const chip = element("span", { class: "cs-word" }, token.text);
            if (token.word >= 0) {
                chip.classList.add("cs-tracked");
                chip.dataset.csWord = String(token.word);
                chip.addEventListener("mouseenter", () => this.safely(() => { state.hover = token.word; this.draw(); }));
                chip.addEventListener("mouseleave", () => this.safely(() => { state.hover = null; this.draw(); }));
                chip.addEventListener("click", () => this.safely(() => { state.word = token.word; this.draw(); }));
            }
            this.words.append(chip);
        });
        const slider = (name) => {
            const input = element("input", { type: "range", min: "0", max: String(data.S - 1), step: "1",
                                             "data-cs": name, title: name === "first" ? "first step" : "last step" });
            input.value = String(name === "first" ? state.first : state.last);
            input.disabled = data.S === 1;
            input.addEventListener("input", () => this.safely(() => {
                const value = Number(input.value);
                if (name === "first") { state.first = value; if (state.last < value) state.last = value; }
                else { state.last = value; if (state.first > value) state.first = value; }
                this.draw();
            }));
            return input;
        };
        this.first = slider("first");
        this.last = slider("last");
        this.stepLabel = element("span", { "data-cs": "step-label" });
        this.marks = element("div", { class: "cs-marks", "data-cs": "marks" });
        const range = element("div", { class: "cs-row" });
        range.append(element("span", {}, "steps"), this.first, this.last, this.stepLabel);
        const controls = element("div", { class: "cs-row" });
        this.opacity = element("input", { type: "range", min: "0", max: "1", step: "0.05", "data-cs": "opacity",
                                          title: "heatmap opacity" });
        this.opacity.value = String(state.alpha);
        this.opacity.addEventListener("input", () => this.safely(() => {
            state.alpha = Number(this.opacity.value); this.draw();
        }));
        this.colormap = element("select", { "data-cs": "colormap" });
        for (const name of Object.keys(data.luts)) this.colormap.append(element("option", { value: name }, name));
        this.colormap.value = state.colormap;
        this.colormap.addEventListener("change", () => this.safely(() => {
            state.colormap = this.colormap.value; this.draw();
        }));
        controls.append(element("span", {}, "opacity"), this.opacity, this.colormap);
        if (data.masks) {
            const label = element("label");
            this.maskToggle = element("input", { type: "checkbox", "data-cs": "masks" });
            this.maskToggle.addEventListener("change", () => this.safely(() => {
                state.masks = this.maskToggle.checked; this.draw();
            }));
            label.append(this.maskToggle, document.createTextNode(" masks"));
            controls.append(label);
        }
        if (data.B > 1) {
            this.imageSelect = element("select", { "data-cs": "image" });
            for (let b = 0; b < data.B; b++) this.imageSelect.append(element("option", { value: String(b) }, `image ${b + 1}`));
            this.imageSelect.addEventListener("change", () => this.safely(() => {
                state.b = Number(this.imageSelect.value); this.draw();
            }));
            controls.append(this.imageSelect);
        }
        this.table = element("div", { "data-cs": "metrics" });
        this.body.append(this.canvas, this.words, range, this.marks, controls, this.table);
        this.body.style.display = "";
        this.message.style.display = "none";
    }

    safely(action) {
        try {
            action();
        } catch (error) {
            console.warn("[ConceptSplit] attention viewer:", error);
            this.report(error);
        }
    }

    draw() {
        this.safely(() => this.render());
    }

    render() {
        const data = this.data, state = this.state;
        if (!data) return;
        const k = state.hover ?? state.word, b = state.b;
        const ref = data.images[b], pixels = this.pixels[b];
        let W, H;
        if (ref) { W = ref.width; H = ref.height; } else {
            const scale = MAP_ONLY_LONG_SIDE / Math.max(data.h, data.w);
            H = Math.max(1, Math.round(data.h * scale)); W = Math.max(1, Math.round(data.w * scale));
        }
        if (ref && !pixels) return; // still loading
        const N = data.h * data.w;
        const mean = rangeMean(data, b, state.first, state.last); // (K·h·w)
        const heat = upsample(normalise(mean.subarray(k * N, (k + 1) * N)), data.h, data.w, H, W);
        const lut = data.luts[state.colormap];
        const alpha = ref ? state.alpha : 1; // without an image the heatmap is shown alone, as the grid does
        const mask = state.masks && data.masks ? data.masks[b].subarray(k * N, (k + 1) * N) : null;
        this.canvas.width = W; this.canvas.height = H;
        const context = this.canvas.getContext("2d");
        const out = context.createImageData(W, H);
        for (let y = 0; y < H; y++) {
            const my = Math.min(Math.floor(y * data.h / H), data.h - 1);
            for (let x = 0; x < W; x++) {
                const i = y * W + x, index = roundHalfEven(heat[i] * 255);
                const dim = mask && !mask[my * data.w + Math.min(Math.floor(x * data.w / W), data.w - 1)] ? 0.35 : 1;
                for (let c = 0; c < 3; c++) {
                    const base = pixels ? pixels[4 * i + c] / 255 : 0;
                    out.data[4 * i + c] = Math.round(dim * 255 * ((1 - alpha) * base + alpha * lut[3 * index + c]));
                }
                out.data[4 * i + 3] = 255;
            }
        }
        context.putImageData(out, 0, 0);
        for (const chip of this.words.children) chip.classList.toggle("cs-active", chip.dataset.csWord === String(k));
        this.first.value = String(state.first); this.last.value = String(state.last);
        const [s0, s1] = [data.steps[state.first], data.steps[state.last]];
        this.stepLabel.textContent = s0 === s1 ? `step ${s0}` : `steps ${s0}-${s1}`;
        this.renderMarks(s0, s1);
        this.renderMetrics(mean, N);
        this.root.dataset.status = "ready";
        this.root.dataset.state = JSON.stringify({ word: k, image: b, first: state.first, last: state.last,
                                                   alpha: state.alpha, colormap: state.colormap, masks: state.masks });
    }

    renderMarks(s0, s1) {
        const data = this.data;
        const count = Math.max(data.totalSteps, data.steps[data.S - 1] + 1);
        this.marks.replaceChildren();
        for (let s = 0; s < count && count <= 1000; s++) {
            const cell = element("span", { title: `step ${s}` });
            if (data.stage1Steps !== null && s < data.stage1Steps) { cell.classList.add("cs-stage1"); cell.title += ": LODA stage 1"; }
            if (data.maskStep === s) { cell.classList.add("cs-mask"); cell.title += ": masks taken"; }
            if (s >= s0 && s <= s1 && data.steps.includes(s)) cell.classList.add("cs-shown");
            this.marks.append(cell);
        }
    }

    renderMetrics(mean, N) {
        const data = this.data;
        const { entropy, pairs } = metrics(mean, data.K, N);
        const table = element("table");
        const head = element("tr");
        head.append(element("th", {}, "word"), element("th", {}, "H (nats)"));
        table.append(head);
        entropy.forEach((value, k) => {
            const row = element("tr", { "data-cs-entropy": String(k) });
            row.append(element("td", {}, data.labels[k]), element("td", {}, value.toFixed(5)));
            table.append(row);
        });
        if (pairs.length) {
            const pairHead = element("tr");
            pairHead.append(element("th", {}, "pair"), element("th", {}, "KL a->b"), element("th", {}, "KL b->a"),
                            element("th", {}, "overlap"));
            table.append(pairHead);
            for (const pair of pairs) {
                const row = element("tr", { "data-cs-pair": `${pair.a},${pair.b}` });
                row.append(element("td", {}, `${data.labels[pair.a]} / ${data.labels[pair.b]}`),
                           element("td", {}, pair.kl_ab.toFixed(5)), element("td", {}, pair.kl_ba.toFixed(5)),
                           element("td", {}, pair.overlap.toFixed(4)));
                table.append(row);
            }
        }
        this.table.replaceChildren(table);
        this.table.dataset.values = JSON.stringify({ entropy, pairs });
    }
}

function viewerOf(node) {
    return node?.__conceptsplitViewer ?? null;
}

function attach(node) {
    if (viewerOf(node)) return viewerOf(node);
    ensureStyle();
    const viewer = new AttentionViewer(node);
    const widget = node.addDOMWidget(WIDGET_NAME, "conceptsplit_viewer", viewer.root, {
        serialize: false, hideOnZoom: false, getMinHeight: () => MIN_HEIGHT, getValue: () => undefined,
        setValue: () => {},
    });
    widget.serialize = false; // never in widgets_values: the node's saved widget order stays as before
    node.__conceptsplitViewer = viewer;
    node.hideOutputImages = true; // frontends that know it: the interactive view replaces the grid preview
    const [width, height] = node.size;
    node.setSize([Math.max(width, 420), Math.max(height, MIN_HEIGHT + 160)]);
    return viewer;
}

function show(node, output) {
    try {
        if (!output || !(KEY in output)) return false;
        attach(node).setPayload(output[KEY]);
        node.setDirtyCanvas?.(true, true);
        return true;
    } catch (error) {
        console.warn("[ConceptSplit] attention viewer:", error);
        return false;
    }
}

/**
 * JSON.parse for ComfyUI's /history, which keeps every prompt as it was posted: Python's json.dumps writes a NaN or
 * infinite input (a hand-edited or API-format prompt the pack refused) as the bare token NaN / Infinity, which
 * JSON.parse rejects, so one such prompt in the history would hide every earlier run. Those tokens outside strings
 * are read as null; text inside strings is left as it is.
 */
function parseHistoryJson(text) {
    try {
        return JSON.parse(text);
    } catch (error) {
        if (!(error instanceof SyntaxError)) throw error;
    }
    const parts = [];
    let start = 0;
    let inString = false;
    for (let i = 0; i < text.length; i++) {
        const c = text[i];
        if (inString) {
            if (c === "\\") i++;
            else if (c === '"') inString = false;
            continue;
        }
        if (c === '"') { inString = true; continue; }
        if (c !== "N" && c !== "I" && c !== "-") continue;
        const token = /^-?(?:NaN|Infinity)/.exec(text.slice(i, i + 9));
        if (token) {
            parts.push(text.slice(start, i), "null");
            i += token[0].length - 1;
            start = i + 1;
        }
    }
    parts.push(text.slice(start));
    return JSON.parse(parts.join(""));
}

/** After a page reload: the newest finished run in ComfyUI's history that has this node's viewer output. */
async function restoreFromHistory(node) {
    const viewer = viewerOf(node);
    if (!viewer || viewer.data) return;
    try {
        const response = await api.fetchApi(`/history?max_items=${HISTORY_ITEMS}`);
        if (!response.ok) return;
        const history = parseHistoryJson(await response.text());
        // Only a run queued from this very workflow (its id is saved in the prompt's extra_pnginfo): the same node id
        // in another workflow, or a prompt posted without a workflow, is someone else's run.
        const workflowId = app.graph?.id;
        if (!workflowId || workflowId === NIL_UUID) return;
        const entries = Object.values(history ?? {})
            .filter((entry) => Array.isArray(entry?.prompt) && entry.outputs?.[String(node.id)]?.[KEY])
            .filter((entry) => entry.prompt[2]?.[String(node.id)]?.class_type === NODE_TYPE)
            .filter((entry) => {
                return entry.prompt[3]?.extra_pnginfo?.workflow?.id === workflowId;
            })
            .sort((a, b) => (b.prompt[0] ?? 0) - (a.prompt[0] ?? 0));
        if (entries.length && !viewer.data) viewer.setPayload(entries[0].outputs[String(node.id)][KEY]);
    } catch (error) {
        console.warn("[ConceptSplit] attention viewer: no run restored from the history:", error);
    }
}

app.registerExtension({
    name: "ConceptSplit.AttentionViewer",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name !== NODE_TYPE) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const result = onNodeCreated?.apply(this, arguments);
            try { attach(this); } catch (error) { console.warn("[ConceptSplit] attention viewer:", error); }
            return result;
        };
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
            const result = onExecuted?.apply(this, arguments);
            show(this, output);
            return result;
        };
    },
    loadedGraphNode(node) {
        if (node?.comfyClass !== NODE_TYPE && node?.type !== NODE_TYPE) return;
        setTimeout(() => restoreFromHistory(node), 0);
    },
    onNodeOutputsUpdated(nodeOutputs) {
        try {
            for (const [locator, output] of Object.entries(nodeOutputs ?? {})) {
                if (!output || !(KEY in output) || String(locator).includes(":")) continue;
                const node = app.graph?.getNodeById?.(Number(locator));
                if (node && (node.comfyClass === NODE_TYPE || node.type === NODE_TYPE)) show(node, output);
            }
        } catch (error) {
            console.warn("[ConceptSplit] attention viewer:", error);
        }
    },
});
