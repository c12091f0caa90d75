// The generate page: a form over the task API. Submit POST /sdapi/v2/tasks/<mode>, follow the task with
// GET /sdapi/v2/tasks/<id> (progress, step, ETA) and POST /internal/progress (live preview), then show
// GET /sdapi/v2/tasks/<id>/result. All of it is read from the task store, so any instance may answer.
import { api, showError, sleep } from "./api.js";
import { setupI18n, t } from "./i18n.js";
import { MaskEditor } from "./mask.js";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 250;
const LAST_SEED = "sdfc.lastSeed";
const NUMBER_FIELDS = ["steps", "cfg_scale", "width", "height", "batch_size", "n_iter", "seed", "denoising_strength"];

let mode = "txt2img";
let models = [];
let currentTask = null;
let lastStatus = null;
let mask = null;

setupI18n(() => { if (lastStatus) lastStatus(); relabelResults(); });
init().catch((error) => showError($("error"), error));

async function init() {
  const [samplers, schedulers, sdModels, options, openapi] = await Promise.all([
    api("GET", "/sdapi/v1/samplers"), api("GET", "/sdapi/v1/schedulers"), api("GET", "/sdapi/v1/sd-models"),
    api("GET", "/sdapi/v1/options"), api("GET", "/openapi.json"),
  ]);
  fill($("sampler"), samplers.map((s) => [s.name, s.name]), "Euler");
  fill($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
  models = sdModels;
  fill($("model"), models.map((m) => [m.title, m.model_name]), options.sd_model_checkpoint);
  applyLimits(openapi);
  for (const tab of document.querySelectorAll("[role=tab]")) tab.addEventListener("click", () => setMode(tab.dataset.mode));
  $("seed-random").addEventListener("click", () => { $("seed").value = "-1"; });
  $("seed-reuse").addEventListener("click", () => {
    const last = localStorage.getItem(LAST_SEED);
    if (last !== null) $("seed").value = last;
  });
  $("seed-reuse").disabled = localStorage.getItem(LAST_SEED) === null;
  $("init_image").addEventListener("change", showInitImage);
  mask = new MaskEditor($("mask"), $("brush"));
  $("mask-clear").addEventListener("click", () => mask.clear());
  $("form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  $("interrupt").addEventListener("click", interrupt);
  fillFromQuery(new URLSearchParams(location.search));
  document.body.dataset.ready = "true";
}

function fill(select, pairs, selected) {
  select.replaceChildren(...pairs.map(([value, label]) => new Option(label, value, false, value === selected)));
}

/** Bounds from /openapi.json, which states the limits this server enforces (size step of its models, max steps). */
function applyLimits(openapi) {
  const props = openapi?.components?.schemas?.StableDiffusionProcessingTxt2Img?.properties || {};
  for (const name of ["width", "height"]) {
    const step = props[name]?.multipleOf;
    if (step) {
      $(name).step = String(step);
      $(name).min = String(step);
    }
  }
  for (const name of ["steps", "batch_size", "n_iter"]) {
    if (props[name]?.maximum) $(name).max = String(props[name].maximum);
  }
  if (props.cfg_scale?.maximum) $("cfg_scale").max = String(props.cfg_scale.maximum);
}

function setMode(next) {
  mode = next;
  for (const tab of document.querySelectorAll("[role=tab]")) tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  $("img2img-fields").hidden = mode !== "img2img";
}

function showInitImage() {
  const file = $("init_image").files[0];
  const img = $("init_preview");
  if (!file) { $("mask-editor").hidden = true; return; }
  readAsDataUrl(file).then((url) => {
    img.onload = () => { mask.reset(img.naturalWidth, img.naturalHeight); $("mask-editor").hidden = false; };
    img.src = url;
  });
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** "Reuse these parameters" from the Images page arrives as a query string. */
function fillFromQuery(params) {
  for (const name of ["prompt", "negative_prompt", ...NUMBER_FIELDS]) {
    if (params.has(name)) $(name).value = params.get(name);
  }
  const choose = (select, value) => {
    const match = [...select.options].find((o) => o.value === value || o.text === value || o.value.toLowerCase() === value.toLowerCase());
    if (match) select.value = match.value;
  };
  if (params.has("sampler")) choose($("sampler"), params.get("sampler"));
  if (params.has("scheduler")) choose($("scheduler"), params.get("scheduler"));
  if (params.has("model")) {
    const model = models.find((m) => m.model_name === params.get("model") || m.title === params.get("model") || m.hash === params.get("model"));
    if (model) $("model").value = model.title;
  }
}

async function payload() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler").value, scheduler: $("scheduler").value,
    steps: int("steps"), cfg_scale: Number($("cfg_scale").value), width: int("width"), height: int("height"),
    seed: int("seed"), batch_size: int("batch_size"), n_iter: int("n_iter"),
  };
  if ($("model").value) {
    body.override_settings = { sd_model_checkpoint: $("model").value };
    body.override_settings_restore_afterwards = true;
  }
  if (mode === "img2img") {
    const file = $("init_image").files[0];
    if (!file) throw new Error(t("need_image"));
    body.init_images = [await readAsDataUrl(file)];
    body.denoising_strength = Number($("denoising_strength").value);
    body.resize_mode = int("resize_mode");
    const painted = mask.toDataUrl();
    if (painted) {
      body.mask = painted;
      body.mask_blur = int("mask_blur");
      body.inpainting_mask_invert = int("inpainting_mask_invert");
      body.inpainting_fill = int("inpainting_fill");
      body.inpaint_full_res = $("inpaint_full_res").value === "1";
    }
  }
  return body;
}

const int = (id) => Math.trunc(Number($(id).value));

async function generate() {
  showError($("error"), null);
  $("results").replaceChildren();
  $("live-preview").hidden = true;
  setProgress(0);
  status(() => t("queued"));
  let body;
  try { body = await payload(); } catch (error) { showError($("error"), error); return; }
  busy(true);
  const started = performance.now();
  try {
    const submitted = await api("POST", `/sdapi/v2/tasks/${mode}`, body);
    currentTask = submitted.task_id;
    const task = await follow(currentTask, body.steps);
    if (task.status === "succeeded" || (task.status === "cancelled" && task.started_at)) {
      const result = await api("GET", `/sdapi/v2/tasks/${task.task_id}/result`);
      showResult(result);
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    if (task.status === "succeeded") { setProgress(100); status(() => t("done", { seconds })); }
    else if (task.status === "cancelled") status(() => t("interrupted"));
    else showError($("error"), new Error(t("failed", { error: task.error || task.status })));
  } catch (error) {
    showError($("error"), error);
  } finally {
    currentTask = null;
    busy(false);
  }
}

async function follow(taskId, requestedSteps) {
  let previewId = -1;
  for (;;) {
    const task = await api("GET", `/sdapi/v2/tasks/${encodeURIComponent(taskId)}`);
    if (TERMINAL.has(task.status)) return task;
    const steps = task.steps || requestedSteps;
    setProgress(Math.round((task.progress || 0) * 100));
    status(() => task.status === "queued" ? t("queued")
      : [t("step", { step: task.step, steps }), task.eta != null ? t("eta", { eta: task.eta.toFixed(1) }) : ""].join("  "));
    if (task.status === "running") {
      const progress = await api("POST", "/internal/progress", { id_task: taskId, id_live_preview: previewId, live_preview: true });
      if (progress.live_preview) {
        $("live-preview").src = progress.live_preview;
        $("live-preview").hidden = false;
        previewId = progress.id_live_preview;
      }
    }
    await sleep(POLL_MS);
  }
}

async function interrupt() {
  if (!currentTask) return;
  $("interrupt").disabled = true;
  try { await api("DELETE", `/sdapi/v2/tasks/${encodeURIComponent(currentTask)}`); } catch (error) { showError($("error"), error); }
}

function busy(on) {
  $("generate").disabled = on;
  $("interrupt").disabled = !on;
}

function setProgress(percent) {
  const bar = $("progress");
  bar.setAttribute("aria-valuenow", String(percent));
  bar.firstElementChild.style.width = `${percent}%`;
}

function status(render) {
  lastStatus = () => { $("progress-text").textContent = render(); };
  lastStatus();
}

function showResult(result) {
  let info = {};
  try { info = JSON.parse(result.info || "{}"); } catch { info = {}; }
  const infotexts = info.infotexts || [];
  if (info.seed != null) {
    localStorage.setItem(LAST_SEED, String(info.seed));
    $("seed-reuse").disabled = false;
  }
  const figures = (result.images || []).map((b64, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${b64}`;
    img.dataset.n = String(i + 1);
    img.alt = t("generated", { n: i + 1 });
    const text = infotexts[i] ?? infotexts[0] ?? "";
    const pre = document.createElement("pre");
    pre.className = "infotext";
    pre.textContent = text;
    const copy = button(t("copy"), () => copyText(text, copy));
    copy.dataset.i18nDynamic = "copy";
    const download = document.createElement("a");
    download.className = "button";
    download.href = img.src;
    download.download = `sdfc-${(info.all_seeds || [])[i] ?? info.seed ?? "image"}-${i + 1}.png`;
    download.textContent = t("download");
    download.dataset.i18nDynamic = "download";
    const actions = document.createElement("div");
    actions.className = "actions";
    const send = button(t("send_to_img2img"), () => sendToImg2img(b64, img));
    send.dataset.i18nDynamic = "send_to_img2img";
    actions.append(copy, download, send);
    figure.append(img, pre, actions);
    return figure;
  });
  $("results").replaceChildren(...figures);
}

function relabelResults() {
  for (const img of $("results").querySelectorAll("img")) img.alt = t("generated", { n: img.dataset.n });
  for (const el of $("results").querySelectorAll("[data-i18n-dynamic]")) el.textContent = t(el.dataset.i18nDynamic);
}

/** "Send to img2img": the result becomes the upload of the img2img tab, at its own size. */
function sendToImg2img(b64, img) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], "result.png", { type: "image/png" }));
  $("init_image").files = transfer.files;
  if (img.naturalWidth) { $("width").value = String(img.naturalWidth); $("height").value = String(img.naturalHeight); }
  showInitImage();
  setMode("img2img");
  $("prompt").focus();
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

async function copyText(text, target) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard permission (plain http beyond localhost): select the text so that the user can copy it.
    const range = document.createRange();
    range.selectNodeContents(target.closest("figure").querySelector("pre"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    return;
  }
  target.textContent = t("copied");
}
