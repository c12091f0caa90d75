// English and Chinese labels. English is the default; the choice is remembered in localStorage.
const STRINGS = {
  en: {
    "nav.generate": "Generate", "nav.images": "Images", "tab.txt2img": "Text to image", "tab.img2img": "Image to image",
    prompt: "Prompt", negative_prompt: "Negative prompt", init_image: "Image", denoising_strength: "Denoising strength",
    sampler: "Sampling method", scheduler: "Schedule type", steps: "Sampling steps", cfg_scale: "CFG scale",
    width: "Width", height: "Height", batch_size: "Batch size", n_iter: "Batch count", seed: "Seed",
    "seed.random": "Random", "seed.reuse": "Reuse last", model: "Model", generate: "Generate", interrupt: "Interrupt",
    progress: "Progress", queued: "Queued…", step: "Step {step}/{steps}", eta: "ETA {eta} s",
    done: "Done in {seconds} s", interrupted: "Interrupted", failed: "Failed: {error}",
    generated: "Generated image {n}", copy: "Copy", copied: "Copied", download: "Download",
    need_image: "Choose an image for image to image", search: "Search prompts", all_models: "All models",
    since: "From", until: "To", refresh: "Refresh", usage: "Usage", images: "Images", gpu_seconds: "GPU seconds",
    cost: "Cost", prev: "Previous", next: "Next", page: "Page {page} of {pages}", total: "{total} images",
    details: "Details", reuse: "Reuse these parameters", close: "Close", none: "No images yet",
    open_details: "Details of image {id}", live_preview: "Live preview", send_to_img2img: "Send to img2img",
  },
  zh: {
    "nav.generate": "生成", "nav.images": "图库", "tab.txt2img": "文生图", "tab.img2img": "图生图",
    prompt: "提示词", negative_prompt: "反向提示词", init_image: "图片", denoising_strength: "重绘幅度",
    sampler: "采样方法", scheduler: "调度类型", steps: "采样步数", cfg_scale: "提示词引导系数 (CFG)",
    width: "宽度", height: "高度", batch_size: "单批数量", n_iter: "总批次数", seed: "随机种子",
    "seed.random": "随机", "seed.reuse": "使用上次", model: "模型", generate: "生成", interrupt: "中断",
    progress: "进度", queued: "排队中…", step: "第 {step}/{steps} 步", eta: "预计剩余 {eta} 秒",
    done: "完成，用时 {seconds} 秒", interrupted: "已中断", failed: "失败：{error}",
    generated: "生成的图片 {n}", copy: "复制", copied: "已复制", download: "下载",
    need_image: "图生图需要先选择一张图片", search: "搜索提示词", all_models: "全部模型",
    since: "开始日期", until: "结束日期", refresh: "刷新", usage: "用量", images: "图片数", gpu_seconds: "GPU 秒数",
    cost: "费用", prev: "上一页", next: "下一页", page: "第 {page} / {pages} 页", total: "共 {total} 张",
    details: "详情", reuse: "使用这些参数", close: "关闭", none: "还没有图片",
    open_details: "图片 {id} 的详情", live_preview: "实时预览", send_to_img2img: "发送到图生图",
  },
};
const KEY = "sdfc.lang";
const listeners = [];

export function lang() {
  const saved = localStorage.getItem(KEY);
  return saved in STRINGS ? saved : "en";
}

export function t(key, vars = {}) {
  const text = STRINGS[lang()][key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(vars[name] ?? ""));
}

/** Label every [data-i18n] element, wire the switch button, and call `rerender` now and on each switch. */
export function setupI18n(rerender = () => {}) {
  listeners.push(rerender);
  const button = document.getElementById("lang");
  button.addEventListener("click", () => {
    localStorage.setItem(KEY, lang() === "en" ? "zh" : "en");
    apply();
  });
  apply();
}

function apply() {
  const current = lang();
  document.documentElement.lang = current === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  const button = document.getElementById("lang");
  button.textContent = current === "en" ? "中文" : "English";
  button.setAttribute("aria-label", current === "en" ? "切换到中文" : "Switch to English");
  document.getElementById("progress")?.setAttribute("aria-label", t("progress"));
  document.getElementById("live-preview")?.setAttribute("alt", t("live_preview"));
  for (const fn of listeners) fn();
}
