// The inpainting mask: strokes painted on a canvas laid over the init image, at the image's own pixel size.
// Sent as A1111's `mask`: a PNG, white where painted (redrawn), black elsewhere; no paint means no mask.
export class MaskEditor {
  constructor(canvas, brushInput) {
    this.canvas = canvas;
    this.brush = brushInput;
    this.painted = false;
    this.last = null;
    canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); this.last = this.point(e); this.stroke(this.last); });
    canvas.addEventListener("pointermove", (e) => { if (this.last) { const p = this.point(e); this.stroke(p); this.last = p; } });
    for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { this.last = null; });
  }

  /** A new image: the canvas takes its natural size and starts empty. */
  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear();
  }

  clear() {
    this.canvas.getContext("2d").clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.painted = false;
  }

  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return { x: (event.clientX - box.left) * (this.canvas.width / box.width),
             y: (event.clientY - box.top) * (this.canvas.height / box.height) };
  }

  stroke(to) {
    const ctx = this.canvas.getContext("2d");
    const box = this.canvas.getBoundingClientRect();
    // The brush size is in screen pixels, as the user sees it, whatever the image's own size.
    ctx.lineWidth = Number(this.brush.value) * (this.canvas.width / (box.width || this.canvas.width));
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.strokeStyle = "#fff";
    ctx.beginPath();
    ctx.moveTo(this.last.x, this.last.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
    this.painted = true;
  }

  /** The mask as a PNG data URL (black background, white paint), or null when nothing was painted. */
  toDataUrl() {
    if (!this.painted) return null;
    const out = document.createElement("canvas");
    out.width = this.canvas.width;
    out.height = this.canvas.height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.drawImage(this.canvas, 0, 0);
    return out.toDataURL("image/png");
  }
}
