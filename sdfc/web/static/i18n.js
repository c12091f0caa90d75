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
    resize_mode: "Resize mode", "resize.0": "Just resize", "resize.1": "Crop and resize", "resize.2": "Resize and fill",
    "resize.3": "Just resize (latent upscale)", "mask.hint": "Paint over the part to redraw (optional: no paint, no mask).",
    "mask.brush": "Brush size", "mask.blur": "Mask blur", "mask.mode": "Mask mode", "mask.mode.0": "Inpaint masked",
    "mask.mode.1": "Inpaint not masked", "mask.fill": "Masked content", "mask.fill.0": "fill", "mask.fill.1": "original",
    "mask.fill.2": "latent noise", "mask.fill.3": "latent nothing", "mask.area": "Inpaint area",
    "mask.area.0": "Whole picture", "mask.area.1": "Only masked", "mask.clear": "Clear mask", mask: "Mask",
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
    resize_mode: "缩放模式", "resize.0": "仅调整大小", "resize.1": "裁剪后缩放", "resize.2": "缩放后填充空白",
    "resize.3": "调整大小（潜空间放大）", "mask.hint": "涂抹需要重绘的部分（可选：不涂抹即不使用蒙版）。",
    "mask.brush": "画笔大小", "mask.blur": "蒙版边缘模糊度", "mask.mode": "蒙版模式", "mask.mode.0": "重绘蒙版内容",
    "mask.mode.1": "重绘非蒙版内容", "mask.fill": "蒙版区域内容处理", "mask.fill.0": "填充", "mask.fill.1": "原图",
    "mask.fill.2": "潜空间噪声", "mask.fill.3": "空白潜空间", "mask.area": "重绘区域",
    "mask.area.0": "整张图片", "mask.area.1": "仅蒙版区域", "mask.clear": "清除蒙版", mask: "蒙版",
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
  document.getElementById("mask")?.setAttribute("aria-label", t("mask"));
  for (const fn of listeners) fn();
}
