"""Head-search objectives: the shapes detector, a local CLIP checkpoint, user functions."""

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from attnsteer.guidance.objectives import load_objective
from attnsteer.guidance.shapes import draw
from attnsteer.pipelines.tiny import clip_tokenizer


def test_shapes_objective_scores_drawn_scenes_against_their_captions():
    (image, caption, _), (other, other_caption, _) = draw(3, n_objects=2), draw(4, n_objects=1)
    assert load_objective("shapes")([image, other], [caption, other_caption]) == [1.0, 1.0]
    wrong = caption.replace("circle", "cross") if "circle" in caption else "a red circle and a red cross"
    assert load_objective("shapes-coverage")([image], [wrong])[0] < 1.0
    assert load_objective("shapes-count_right")([image], ["a red circle"]) == [0.0]
    with pytest.raises(ValueError, match=r"shapes metric 'area' is not one of \('binding'"):
        load_objective("shapes-area")


def test_clip_objective_is_the_cosine_of_a_local_checkpoints_embeddings(tmp_path):
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, projection_dim=16).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8, projection_dim=16).to_dict(),
        projection_dim=16)
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    clip_tokenizer().save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    images = [draw(i)[0] for i in range(3)]
    prompts = ["a red circle", "a blue square and a green star", "a photo"]
    scores = load_objective(f"clip:{tmp_path}")(images, prompts)
    tok = clip_tokenizer()(prompts, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessor.from_pretrained(tmp_path)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels)
    expected = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="is not a local folder"):
        load_objective(f"clip:{tmp_path / 'missing'}")


def test_user_objective_by_module_or_file(tmp_path):
    (tmp_path / "mine.py").write_text("def score(images, prompts):\n    return [len(p) for p in prompts]\n")
    assert load_objective(f"{tmp_path / 'mine.py'}:score")([None, None], ["ab", "abc"]) == [2, 3]
    assert load_objective("attnsteer.guidance.objectives:shapes_objective") is not None
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_objective(f"{tmp_path / 'mine.py'}:nope")
    with pytest.raises(ValueError, match="objective module 'no_such_module' cannot be imported"):
        load_objective("no_such_module:f")
    with pytest.raises(ValueError, match="is not 'shapes"):
        load_objective("pickscore")
    (tmp_path / "broken.py").write_text("def score(images, prompts)\n    return []\n")
    with pytest.raises(ValueError, match=r"objective module '.*broken.py' cannot be imported: SyntaxError"):
        load_objective(f"{tmp_path / 'broken.py'}:score")
    with pytest.raises(ValueError, match=r"objective file '.*missing.py' does not exist"):
        load_objective(f"{tmp_path / 'missing.py'}:score")
