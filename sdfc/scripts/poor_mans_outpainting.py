"""Poor man's outpainting (A1111 scripts/poor_mans_outpainting.py, img2img): the image is placed on a black
canvas grown by `pixels` in each chosen direction (the totals rounded up to multiples of 64), the canvas is
cut into tiles of the request's width x height overlapping by `pixels`, and every tile that reaches past the
original is inpainted (its own mask, blurred by 2 × `mask_blur`, and latent mask drawn `mask_blur` // 2
inside the original), one job each with consecutive seeds; the tiles are blended back into one image, the
only image returned, with the first tile's infotext."""
from __future__ import annotations

import dataclasses

from PIL import Image

from ..api.errors import ApiError
from ..api.images import MAX_IMAGE_PIXELS
from ..engine.inpaint import MASKED_CONTENT
from . import grids
from .base import Arg, Context, Job, Output, Runner, Script
from .outpainting_mk2 import check_directions, direction_arg, grow_sides, rectangle_mask


def canvas_and_masks(init: Image.Image, grow: dict, blur: int):
    """The grown canvas with the image at its place, the mask (white: repainted) and the latent mask."""
    left, right, up, down = (grow[d] for d in ("left", "right", "up", "down"))
    size = (init.width + left + right, init.height + up + down)
    canvas = Image.new("RGB", size)
    canvas.paste(init, (left, up))  # Pillow converts the image's mode (an alpha channel is dropped)

    def inner(margin: int):
        return (left + (margin if left else 0), up + (margin if up else 0),
                size[0] - right - (margin if right else 0), size[1] - down - (margin if down else 0))
    return canvas, rectangle_mask(size, inner(blur * 2), "L"), rectangle_mask(size, inner(blur // 2), "L")


class PoorMansOutpainting(Script):
    title = "Poor man's outpainting"
    modes = ("img2img",)

    def args(self, mode):
        return [
            Arg("Pixels to expand", "int", 128, minimum=8, maximum=256, step=8),
            Arg("Mask blur", "int", 4, minimum=0, maximum=64, step=1),
            Arg("Masked content", "index", "fill", choices=tuple(MASKED_CONTENT.values())),
            direction_arg(),
        ]

    def parse_args(self, mode, raw):
        args = super().parse_args(mode, raw)
        check_directions(self.title, args[3])
        return args

    def prepare(self, ctx: Context, args) -> Job:
        pixels, blur, fill, directions = args
        seed, subseed = ctx.resolve_seeds()
        req, options = ctx.request({"seed": seed, "subseed": subseed, "batch_size": 1, "n_iter": 1,
                                    "mask": None, "latent_mask": None, "inpaint_full_res": False,
                                    "inpainting_fill": fill})
        req = dataclasses.replace(req, inpaint=dataclasses.replace(req.inpaint, mask_blur_x=blur * 2,
                                                                   mask_blur_y=blur * 2))
        tile_w, tile_h = req.width, req.height
        if pixels >= min(tile_w, tile_h):
            raise ApiError(400, f"Poor man's outpainting: the tiles overlap by the pixels to expand ({pixels}), "
                                f"which must be below the tile size {tile_w}x{tile_h} (width, height)",
                           error="ValueError")
        source = req.init_images[0]
        grow = grow_sides(source.size, pixels, directions)
        size = (source.width + grow["left"] + grow["right"], source.height + grow["up"] + grow["down"])
        if size[0] * size[1] > MAX_IMAGE_PIXELS:
            raise ApiError(400, f"Poor man's outpainting: the outpainted image would be {size[0]}x{size[1]}, over "
                                f"the limit of {MAX_IMAGE_PIXELS} pixels", error="LimitExceeded")
        canvas, mask, latent_mask = canvas_and_masks(source, grow, blur)
        grid, mask_grid, latent_grid = (grids.split_grid(im, tile_w, tile_h, pixels)
                                        for im in (canvas, mask, latent_mask))
        right_edge, bottom_edge = canvas.width - grow["right"], canvas.height - grow["down"]

        def inside(x: int, y: int) -> bool:  # wholly within the original: nothing to outpaint
            return x >= grow["left"] and x + tile_w <= right_edge and y >= grow["up"] and y + tile_h <= bottom_edge
        work = [(tile, m, lm) for row, mrow, lrow in zip(grid.rows, mask_grid.rows, latent_grid.rows)
                for tile, m, lm in zip(row.tiles, mrow.tiles, lrow.tiles) if not inside(tile.x, row.y)]
        if not work:
            raise ApiError(400, "Poor man's outpainting: nothing to outpaint (choose at least one direction)",
                           error="ValueError")
        ctx.count(len(work), req.steps)
        ctx.check_budget(1)

        def run(runner: Runner) -> Output:
            next_seed, first, done = seed, None, 0
            for tile, tile_mask, tile_latent in work:
                if runner.interrupted:
                    break
                made = runner.generate(req, options, seed=next_seed, init_images=[tile.image],
                                       mask=tile_mask.image, latent_mask=tile_latent.image)
                if not made:
                    break
                first = first or made[0]
                next_seed = made[0].seed + 1
                tile.image = made[0].image
                done += 1
            if first is None:
                return Output([], None)
            for tile, _, _ in work[done:]:  # not reached (an interrupt): black, as A1111's missing results
                tile.image = Image.new("RGB", (tile_w, tile_h))
            picture = dataclasses.replace(first, image=grids.combine_grid(grid))
            return Output([picture], picture)
        return Job(len(work), run)
