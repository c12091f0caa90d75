// The Images page: the gallery API (GET /gallery/api/images, /models, /usage, /images/<id>) as a grid with
// search, filters, pagination, a details view and "Reuse these parameters" (a link to / with the query string).
import { api, showError } from "./api.js";
import { setupI18n, t } from "./i18n.js";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 24;
const HIDDEN_COLUMNS = new Set(["image_url", "infotext"]);
let page = 1;
let pages = 1;
let total = 0;
let usage = null;
let loading = Promise.resolve();

setupI18n(() => { renderCounts(); renderUsage(); relabelGrid(); });
$("refresh").addEventListener("click", () => refresh());
$("filters").addEventListener("submit", (event) => { event.preventDefault(); page = 1; refresh(); });
$("q").addEventListener("keydown", (event) => { if (event.key === "Enter") { event.preventDefault(); page = 1; refresh(); } });
for (const id of ["model-filter", "since", "until"]) $(id).addEventListener("change", () => { page = 1; refresh(); });
$("prev").addEventListener("click", () => { if (page > 1) { page -= 1; refresh(); } });
$("next").addEventListener("click", () => { if (page < pages) { page += 1; refresh(); } });
$("details-close").addEventListener("click", () => $("details").close());
refresh();

function filters() {
  const params = new URLSearchParams();
  const q = $("q").value.trim();
  if (q) params.set("q", q);
  if ($("model-filter").value) params.set("model", $("model-filter").value);
  if ($("since").value) params.set("since", $("since").value);
  if ($("until").value) params.set("until", $("until").value);
  return params;
}

/** One load at a time, in order: a click during a load waits for it instead of racing it. */
function refresh() {
  loading = loading.then(load, load);
  return loading;
}

async function load() {
  showError($("error"), null);
  document.body.dataset.ready = "false";
  try {
    const params = filters();
    const query = new URLSearchParams(params);
    query.set("page", String(page));
    query.set("page_size", String(PAGE_SIZE));
    const [list, models, spent] = await Promise.all([
      api("GET", `/gallery/api/images?${query}`), api("GET", "/gallery/api/models"),
      api("GET", `/gallery/api/usage?${params}`),
    ]);
    fillModels(models.models || []);
    total = list.total;
    pages = Math.max(1, list.pages || 1);
    usage = spent;
    renderGrid(list.items);
    renderCounts();
    renderUsage();
  } catch (error) {
    showError($("error"), error);
  } finally {
    document.body.dataset.ready = "true";
  }
}

function fillModels(names) {
  const select = $("model-filter");
  const selected = select.value;
  const all = select.options[0];
  select.replaceChildren(all, ...names.map((name) => new Option(name, name, false, name === selected)));
}

function renderGrid(items) {
  const cells = items.map((item) => {
    const li = document.createElement("li");
    li.dataset.id = String(item.id);
    const open = document.createElement("button");
    open.type = "button";
    open.className = "thumb";
    open.dataset.id = String(item.id);
    open.setAttribute("aria-label", t("open_details", { id: item.id }));
    const img = document.createElement("img");
    img.src = item.image_url;
    img.alt = item.prompt || `#${item.id}`;
    img.loading = "lazy";
    open.append(img);
    open.addEventListener("click", () => showDetails(item.id));
    const caption = document.createElement("p");
    caption.className = "caption";
    caption.textContent = item.prompt || "";
    const meta = document.createElement("p");
    meta.className = "muted";
    meta.textContent = `#${item.id} · ${item.model || ""} · ${(item.created_at || "").replace("T", " ").slice(0, 19)}`;
    const download = downloadLink(item.id);
    li.append(open, caption, meta, download);
    return li;
  });
  $("grid").replaceChildren(...cells);
  $("prev").disabled = page <= 1;
  $("next").disabled = page >= pages;
}

function downloadLink(id) {
  const a = document.createElement("a");
  a.className = "button";
  a.href = `/gallery/api/images/${id}/image.png`;
  a.download = `sdfc-${id}.png`;
  a.textContent = t("download");
  a.dataset.i18nDynamic = "download";
  return a;
}

function relabelGrid() {
  for (const el of document.querySelectorAll("[data-i18n-dynamic]")) el.textContent = t(el.dataset.i18nDynamic);
  for (const el of document.querySelectorAll("button.thumb")) el.setAttribute("aria-label", t("open_details", { id: el.dataset.id }));
}

function renderCounts() {
  $("summary").textContent = total ? t("total", { total }) : t("none");
  $("page-info").textContent = t("page", { page, pages });
}

function renderUsage() {
  const dl = $("usage-total");
  if (!usage) { dl.replaceChildren(); return; }
  const rows = [[t("images"), usage.total.images], [t("gpu_seconds"), (usage.total.gpu_seconds ?? 0).toFixed(2)],
    [t("cost"), `${(usage.total.cost ?? 0).toFixed(6)} ${usage.currency || ""}`]];
  dl.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", k), el("dd", String(v))]));
}

const el = (tag, text) => { const e = document.createElement(tag); e.textContent = text; return e; };

async function showDetails(id) {
  let record;
  try { record = await api("GET", `/gallery/api/images/${id}`); } catch (error) { showError($("error"), error); return; }
  $("details-image").src = record.image_url;
  $("details-image").alt = record.prompt || `#${record.id}`;
  const rows = Object.entries(record).filter(([k]) => !HIDDEN_COLUMNS.has(k)).map(([k, v]) => {
    const tr = document.createElement("tr");
    tr.append(el("th", k), el("td", v == null ? "" : String(v)));
    return tr;
  });
  $("details-table").tBodies[0].replaceChildren(...rows);
  $("details-infotext").textContent = record.infotext || "";
  $("details-reuse").href = `/?${reuseQuery(record)}`;
  $("details-download").href = record.image_url;
  $("details-download").download = `sdfc-${record.id}.png`;
  $("details").showModal();
}

/** The generate form's fields from a record (the schedule type is only in its infotext). */
function reuseQuery(record) {
  const params = new URLSearchParams();
  const put = (name, value) => { if (value !== null && value !== undefined && value !== "") params.set(name, String(value)); };
  put("prompt", record.prompt);
  put("negative_prompt", record.negative_prompt);
  put("steps", record.steps);
  put("sampler", record.sampler);
  put("cfg_scale", record.cfg_scale);
  put("seed", record.seed);
  const size = /^(\d+)x(\d+)$/.exec(record.size || "");
  if (size) { put("width", size[1]); put("height", size[2]); }
  put("model", record.model);
  const schedule = /(?:^|, )Schedule type: ([^,\n]+)/m.exec(record.infotext || "");
  if (schedule) put("scheduler", schedule[1].trim());
  return params;
}
