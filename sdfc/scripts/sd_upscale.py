"""SD upscale (A1111 scripts/sd_upscale.py, img2img): the init image is enlarged with a pixel upscaler,
cut into overlapping tiles of the request's width × height, each tile run through img2img, and the tiles
blended back. One image per n_iter (seed + n); tiles of a batch take consecutive seeds and each batch
starts one above the previous batch's first seed, as A1111. Every image carries the first tile's infotext."""
from __future__ import annotations

import dataclasses
import math

from PIL import Image

from ..api.errors import ApiError
from ..api.images import MAX_IMAGE_PIXELS
from ..engine.upscale import PIXEL_UPSCALERS, _upscaler_pass
from . import grids
from .base import Arg, Context, Job, Output, Runner, Script

INFO_HTML = ("<p style=\"margin-bottom:0.75em\">Will upscale the image by the selected scale factor; "
             "use width and height sliders to set tile size</p>")


def flatten(image: Image.Image, color: str = "#ffffff") -> Image.Image:
    """A1111's images.flatten: transparency over the img2img background colour."""
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, color)
        background.paste(image, mask=image)
        return background.convert("RGB")
    return image.convert("RGB")


def upscale(image: Image.Image, name: str, scale: float) -> Image.Image:
    if name == "None":
        return image  # as A1111: no upscaler, no enlargement
    return _upscaler_pass(image, scale, PIXEL_UPSCALERS[name])


class SDUpscale(Script):
    title = "SD upscale"
    modes = ("img2img",)

    def args(self, mode):
        return [
            Arg("", "html", INFO_HTML),
            Arg("Tile overlap", "int", 64, minimum=0, maximum=256, step=16),
            Arg("Upscaler", "index", "None", choices=tuple(PIXEL_UPSCALERS)),
            Arg("Scale Factor", "float", 2.0, minimum=1.0, maximum=4.0, step=0.05),
        ]

    def prepare(self, ctx: Context, args) -> Job:
        _, overlap, upscaler_index, scale = args
        if ctx.values.get("mask"):
            # A1111 would apply the whole image's mask to every tile: nothing a client can mean; refused.
            raise ApiError(400, "SD upscale does not take a mask", error="NotImplementedError")
        upscaler = list(PIXEL_UPSCALERS)[upscaler_index]
        extra = {"SD upscale overlap": overlap, "SD upscale upscaler": upscaler}
        batch_size = int(ctx.values.get("batch_size") or 1)
        n_iter = int(ctx.values.get("n_iter") or 1)
        seed, subseed = ctx.resolve_seeds()
        template, options = ctx.request({"seed": seed, "subseed": subseed, "n_iter": 1})
        tile_w, tile_h = template.width, template.height
        if overlap >= min(tile_w, tile_h):
            raise ApiError(400, f"SD upscale: tile overlap {overlap} must be below the tile size {tile_w}x{tile_h}",
                           error="ValueError")
        source = template.init_images[0]
        if upscaler == "None":
            out_w, out_h = source.size
        else:  # A1111's Upscaler.upscale aims at the scaled size floored to a multiple of 8
            out_w, out_h = int(source.width * scale // 8 * 8), int(source.height * scale // 8 * 8)
        if out_w * out_h > MAX_IMAGE_PIXELS or out_w < 1 or out_h < 1:
            raise ApiError(400, f"SD upscale: the upscaled image would be {out_w}x{out_h}, over the limit of "
                                f"{MAX_IMAGE_PIXELS} pixels", error="LimitExceeded")
        xs, ys = grids.tile_layout(out_w, out_h, tile_w, tile_h, overlap)
        tiles = len(xs) * len(ys)
        batches = math.ceil(tiles / batch_size)
        ctx.count(tiles * n_iter, template.steps)
        ctx.check_budget(n_iter)
        # A short last batch runs as its own size (A1111 shrinks batch_size to the images it has, and a
        # lone tile's repeats are discarded).
        sizes = {min(batch_size, tiles - i * batch_size) for i in range(batches)}
        requests = {k: ctx.request({"seed": seed, "subseed": subseed, "n_iter": 1, "batch_size": k})
                    for k in sizes}

        def run(runner: Runner) -> Output:
            image = upscale(flatten(source), upscaler, scale)
            grid = grids.split_grid(image, tile_w, tile_h, overlap)
            cells = [tile for row in grid.rows for tile in row.tiles]
            sources = [tile.image for tile in cells]  # each n_iter starts again from the upscaled tiles
            results, first_info = [], None
            for n in range(n_iter):
                batch_seed = seed + n
                made = []
                for i in range(batches):
                    if runner.interrupted:
                        break
                    work = sources[i * batch_size:(i + 1) * batch_size]
                    req, opts = requests[len(work)]
                    pictures = runner.generate(req, opts, extra, seed=batch_seed, init_images=work)
                    if first_info is None and pictures:
                        first_info = pictures[0].infotext
                    batch_seed = (pictures[0].seed if pictures else batch_seed) + 1
                    made += pictures
                if not made:
                    break
                for i, tile in enumerate(cells):
                    tile.image = made[i].image if i < len(made) else Image.new("RGB", (tile_w, tile_h))
                combined = grids.combine_grid(grid)
                results.append(dataclasses.replace(made[0], image=combined, seed=seed + n))
                if runner.interrupted:
                    break
            if not results:
                return Output([], None)
            results = [dataclasses.replace(r, infotext=first_info) for r in results]
            return Output(results, results[0], extra_params=extra)
        return Job(batches * n_iter, run)
