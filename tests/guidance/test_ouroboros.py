"""Ouroboros' subject parts: the bank loss by hand, per-frame masks, the queue shift, and the guidance
step moving the latent down the loss on a tiny Wan transformer."""

import torch

from attnsteer.attention_processors import CROSS, SELF, list_layers, steering
from attnsteer.attention_processors.memory import FrameMemory
from attnsteer.guidance.ouroboros import Ouroboros, bank_loss, subject_masks
from attnsteer.pipelines.tiny import tiny_pipeline


def test_bank_loss_is_the_mean_over_layers_of_each_rows_present_subjects_cosine_distance():
    g = torch.Generator().manual_seed(0)
    pooled = {n: torch.randn(2, 3, 2, 4, generator=g) for n in "ab"}
    bank = {n: torch.randn(2, 3, 2, 4, generator=g) for n in "ab"}
    present = torch.tensor([[True, False, True], [False, True, False]])
    expected = 0.0
    for n in "ab":
        for row, subjects in ((0, [0, 2]), (1, [1])):
            for s in subjects:
                a, b = pooled[n][row, s].flatten(), bank[n][row, s].flatten()
                expected += (1 - a @ b / (a.norm() * b.norm())) / len(subjects) / 2
    torch.testing.assert_close(bank_loss(pooled, bank, present), expected)


def test_masks_are_binarised_per_frame_so_a_faint_frame_keeps_its_subject():
    maps = torch.zeros(1, 1, 2, 4, 4)
    maps[0, 0, 0, :2, :2] = 1.0
    maps[0, 0, 1, 2:, 2:] = 0.01  # a hundred times fainter, elsewhere
    masks = subject_masks(maps)
    assert masks[0, 0, 0, :2, :2].all() and masks[0, 0, 0].sum() == 4
    assert masks[0, 0, 1, 2:, 2:].all() and masks[0, 0, 1].sum() == 4


def test_the_slots_masks_move_with_the_queue_and_the_new_tail_has_none():
    ouro = Ouroboros([[[1]]], [], [], length=3)
    noted = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    noted[:, :, 0, 0, 0] = noted[:, :, 1, 1, 1] = True
    ouro._note_masks(noted, 1)  # slots 1 and 2
    ouro.shift()
    assert ouro.masks[0, 0, 0, 0, 0] and ouro.masks[0, 0, 1, 1, 1] and not ouro.masks[0, 0, 2].any()
    assert ouro.masks.sum() == 2 and ouro.next_masks is None


def test_self_recurrent_guidance_moves_the_latent_down_the_bank_loss():
    model = tiny_pipeline("wan").transformer
    layers = list_layers(model)
    cross = [n for n, i in layers.items() if i.kind == CROSS]
    own = [n for n, i in layers.items() if i.kind == SELF]
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g)
    t = torch.full((1, 32), 600.0)
    predict = lambda z: model(hidden_states=z, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    masks = torch.rand(1, 1, 4, 4, 4, generator=g) > 0.5
    heads, dim = model.config.num_attention_heads, model.config.attention_head_dim
    bank = {n: torch.randn(1, 1, heads, dim, generator=g) for n in own}

    def velocity(guidance):
        ouro = Ouroboros([[[1]]], cross, own, length=4, cross_frame=False, guidance=guidance)
        with torch.no_grad(), ouro.attached(model):
            ouro.masks, ouro.bank, ouro.banked = masks, bank, torch.ones(1, 1, dtype=torch.bool)
            return ouro.velocity(x, 2, predict, None, 1.0, model)

    memory = FrameMemory(own)

    def loss(z):
        memory.masks = masks[:, :, 2:].flatten(2)
        with steering(model, [memory]):
            predict(z)
        return bank_loss(memory.pooled, bank, torch.ones(1, 1, dtype=torch.bool))

    step = velocity(0.5) - velocity(0.0)
    leaf = x.clone().requires_grad_(True)
    gradient = torch.autograd.grad(loss(leaf), leaf)[0]
    assert torch.cosine_similarity(step.flatten(), gradient.flatten(), dim=0) > 0.999
    with torch.no_grad():
        assert loss(x - 0.01 * step) < loss(x) - 1e-6
    assert all(type(layers[n].module.processor).__name__ == "WanAttnProcessor" for n in own + cross)
