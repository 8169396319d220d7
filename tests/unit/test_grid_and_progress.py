"""Legible sample grids (nearest-neighbour upscale, one labelled row per prompt) and the step-titled bar."""

import numpy as np
import torch

from sdtrain.diffusion.grid import LABEL_WIDTH, MIN_CELL, PAD, labelled_grid


def test_grid_rows_are_prompts_and_small_images_are_upscaled_by_nearest_neighbour():
    images = torch.rand(6, 3, 32, 32)
    grid = labelled_grid(images, ["red heart", "cat face"], per_row=3)
    cell = MIN_CELL  # 32 px -> 4x
    assert grid.size == (LABEL_WIDTH + 3 * (cell + PAD) + PAD, 2 * (cell + PAD) + PAD)
    pixels = np.asarray(grid)
    first = pixels[PAD : PAD + cell, LABEL_WIDTH + PAD : LABEL_WIDTH + PAD + cell]
    expected = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(first[::4, ::4], expected) and np.array_equal(first[3::4, 3::4], expected)  # blocks
    label = pixels[PAD : PAD + 20, :LABEL_WIDTH]
    assert (label < 128).any()  # the prompt is written beside its row


def test_progress_bar_is_titled_by_steps_not_an_endless_epoch_count():
    from types import SimpleNamespace

    from sdtrain.training.callbacks.progress import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=1400)
    assert bar._get_train_description(0) == "Training (max 1400 steps)"
