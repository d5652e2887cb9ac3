"""``ip2p eval magicbrush``: the MagicBrush test layout, its single- and multi-turn editing, the
evaluation script's metrics, and the command end to end, on a tiny synthetic test folder with
tiny random CLIP and DINO models and the bundled shapes model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ip2p_jax.apps.cli.main import main
from ip2p_jax.evaluation import magicbrush
from ip2p_jax.evaluation.magicbrush_layout import read_layout
from ip2p_jax.evaluation.magicbrush_metrics import MagicBrushScorer

# session: (image size (w, h), instructions); turn k edits output k-1 (the input for k = 1)
SESSIONS = {
    "101": ((32, 32), ["add a red square"]),
    "202": ((48, 40), ["make the circle blue", "remove the square"]),
    "303": ((32, 32), ["add a circle", "move it left", "make it green"]),
}
STEPS = 3
BATCH = 4
METRIC_NAMES = {"l1", "l2", "clip_i", "clip_t", "dino", "clip_t_oracle"}

# -- fixtures ---------------------------------------------------------------------------------


def _pixels(seed: int, size: tuple[int, int], high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (size[1], size[0], 3), np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A MagicBrush test folder in miniature: sessions of 1-3 turns, masks, both captions."""
    root = tmp_path_factory.mktemp("magicbrush") / "test"
    sessions, local, global_ = {}, {}, {}
    for s, (name, (size, instructions)) in enumerate(SESSIONS.items()):
        folder = root / "images" / name
        folder.mkdir(parents=True)
        Image.fromarray(_pixels(10 * s, size)).save(folder / f"{name}-input.png")
        turns, previous = [], f"{name}-input.png"
        local[name], global_[name] = {}, {f"{name}-input.png": f"scene {name}"}
        for k, instruction in enumerate(instructions, start=1):
            output, mask = f"{name}-output{k}.png", f"{name}-mask{k}.png"
            Image.fromarray(_pixels(10 * s + k, size)).save(folder / output)
            Image.fromarray(_pixels(99, size)[..., 0]).save(folder / mask)
            turns.append(
                {"input": previous, "mask": mask, "output": output, "instruction": instruction}
            )
            local[name][output] = f"a {instruction.split()[-1]}"
            global_[name][output] = f"scene {name} after {instruction}"
            previous = output
        sessions[name] = turns
    for file, content in (
        ("edit_sessions.json", sessions),
        ("local_descriptions.json", local),
        ("global_descriptions.json", global_),
    ):
        (root / file).write_text(json.dumps(content))
    return root


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    from ip2p_jax.testing.reference_models import build_clip_folder

    return build_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory) -> Path:
    """A tiny random ViTModel at DINO's 224 px (large patches keep it cheap)."""
    from ip2p_jax.testing.reference_models import build_vit_folder

    path = tmp_path_factory.mktemp("dino") / "dino"
    return build_vit_folder(path, image_size=224, patch_size=32)


@pytest.fixture(scope="module")
def scorer(clip_folder, dino_folder) -> MagicBrushScorer:
    return MagicBrushScorer(clip_folder, dino_folder)


@pytest.fixture(scope="module")
def pipe():
    from ip2p_jax.apps.shipped import shipped_model
    from ip2p_jax.pipelines.auto import load_edit_pipeline

    return load_edit_pipeline(shipped_model())


class RecordingEditor:
    """A stand-in model: halves the pixels and adds the instruction's length (so a wrong
    input or instruction shows), recording each call's batch."""

    def __init__(self):
        self.calls: list[list[str]] = []

    @staticmethod
    def apply(image: Image.Image | np.ndarray, instruction: str) -> np.ndarray:
        pixels = image.convert("RGB") if isinstance(image, Image.Image) else image
        return np.asarray(pixels) // 2 + len(instruction)

    def __call__(self, images, instructions):
        self.calls.append(list(instructions))
        return [
            Image.fromarray(self.apply(im, text))
            for im, text in zip(images, instructions, strict=True)
        ]


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# -- the layout -------------------------------------------------------------------------------


def test_layout_reads_sessions_turns_and_captions(data):
    sessions = read_layout(data)
    assert [s.name for s in sessions] == list(SESSIONS)
    turn = sessions[2].turns[2]
    assert (turn.number, turn.instruction) == (3, "make it green")
    assert turn.source == data / "images/303/303-output2.png"
    assert turn.target == data / "images/303/303-output3.png"
    assert turn.caption == "a green"
    assert read_layout(data, captions="global")[1].turns[0].caption == (
        "scene 202 after make the circle blue"
    )
    assert read_layout(data, captions=None, num=2)[1].turns[1].caption is None
    assert len(read_layout(data, num=2)) == 2


def _drop_image(root: Path) -> None:
    (root / "images/202/202-output2.png").unlink()


def _bad_json(root: Path) -> None:
    (root / "edit_sessions.json").write_text('{"101": [')


def _no_instruction(root: Path) -> None:
    sessions = json.loads((root / "edit_sessions.json").read_text())
    del sessions["202"][1]["instruction"]
    (root / "edit_sessions.json").write_text(json.dumps(sessions))


def _no_caption(root: Path) -> None:
    captions = json.loads((root / "local_descriptions.json").read_text())
    del captions["303"]["303-output3.png"]
    (root / "local_descriptions.json").write_text(json.dumps(captions))


def _not_an_image(root: Path) -> None:
    (root / "images/101/101-input.png").write_bytes(b"not a png")


def _escaping_name(root: Path) -> None:
    sessions = json.loads((root / "edit_sessions.json").read_text())
    sessions["202"][0]["input"] = "../101/101-input.png"
    (root / "edit_sessions.json").write_text(json.dumps(sessions))


BREAKAGES = {
    "missing image": (_drop_image, FileNotFoundError, "202-output2.png"),
    "malformed json": (_bad_json, ValueError, "edit_sessions.json: not valid JSON"),
    "missing key": (_no_instruction, ValueError, "['202'][1]: missing or empty 'instruction'"),
    "missing caption": (_no_caption, ValueError, "local_descriptions.json: no caption at"),
    "not an image": (_not_an_image, ValueError, "101-input.png: not a readable image"),
    "path in a name": (_escaping_name, ValueError, "is not a plain file or folder name"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_layout_errors_name_the_file_and_key(data, tmp_path, breakage):
    root = shutil.copytree(data, tmp_path / "test")
    read_layout(root)  # the copy is fine before it is broken
    damage, error, message = BREAKAGES[breakage]
    damage(root)
    with pytest.raises(error) as info:
        read_layout(root)
    assert message in str(info.value)


def test_cli_refuses_a_broken_folder_before_loading_a_model(data, tmp_path, monkeypatch, capsys):
    import ip2p_jax.pipelines.auto as auto

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for a broken folder")

    monkeypatch.setattr(auto, "load_edit_pipeline", no_load)
    root = shutil.copytree(data, tmp_path / "test")
    _drop_image(root)
    code = main(["eval", "magicbrush", "--data", str(root), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "202-output2.png not found" in capsys.readouterr().err


# -- editing ----------------------------------------------------------------------------------


def test_edit_size_is_the_edit_scripts_fit():
    assert magicbrush.edit_size(512, 512, 512) == (512, 512)
    assert magicbrush.edit_size(640, 480, 512) == (512, 384)
    assert magicbrush.edit_size(480, 640, 512) == (384, 512)
    # the short side rounds up to 64 first (153.6 -> 192), which sets the scale
    assert magicbrush.edit_size(1000, 300, 512) == (640, 192)  # long side past 512
    assert magicbrush.edit_size(48, 40, 64) == (64, 64)
    with pytest.raises(ValueError, match="at least 64"):
        magicbrush.edit_size(32, 32, 32)


def test_multi_turn_chains_outputs_and_single_turn_starts_from_the_truth(data, tmp_path):
    sessions = read_layout(data)
    editor = RecordingEditor()
    out = tmp_path / "images"
    edited, skipped = magicbrush.generate(sessions, editor, out, batch_size=BATCH)
    assert (edited, skipped) == (9, 0)  # 3 first turns, 3 single-turn, 3 multi-turn
    # Every call is padded to one batch size: one compile per input size.
    assert {len(call) for call in editor.calls} == {BATCH}
    for session in sessions:
        name, chained = session.name, None
        for turn in session.turns:
            truth = Image.open(turn.source)
            independent = RecordingEditor.apply(truth, turn.instruction)
            chained = independent if chained is None else editor.apply(chained, turn.instruction)
            if turn.number == 1:
                np.testing.assert_array_equal(_read(out / name / f"{name}_1.png"), chained)
                continue
            inde = _read(out / name / f"{name}_inde_{turn.number}.png")
            iter_ = _read(out / name / f"{name}_iter_{turn.number}.png")
            np.testing.assert_array_equal(inde, independent)
            np.testing.assert_array_equal(iter_, chained)
            assert not np.array_equal(inde, iter_)
    # Single-turn alone makes no iterative images; multi-turn alone no independent ones.
    single = tmp_path / "single"
    magicbrush.generate(sessions, RecordingEditor(), single, settings=[magicbrush.SINGLE])
    assert not list(single.rglob("*_iter_*")) and len(list(single.rglob("*_inde_*"))) == 3
    multi = tmp_path / "multi"
    magicbrush.generate(sessions, RecordingEditor(), multi, settings=[magicbrush.MULTI])
    assert not list(multi.rglob("*_inde_*")) and len(list(multi.rglob("*_iter_*"))) == 3


def test_a_rerun_edits_only_the_missing_images(data, tmp_path):
    sessions = read_layout(data)
    out = tmp_path / "images"
    magicbrush.generate(sessions, RecordingEditor(), out, batch_size=BATCH)
    (out / "303/303_iter_3.png").unlink()
    stale = out / "303/.303_iter_3.png.k1lled"  # what a run killed mid-write leaves
    stale.write_bytes(b"half a png")
    kept = out / "202/202_inde_2.png"
    marker = np.full((8, 8, 3), 7, np.uint8)
    Image.fromarray(marker).save(kept)
    editor = RecordingEditor()
    assert magicbrush.generate(sessions, editor, out, batch_size=BATCH) == (1, 8)
    assert editor.calls == [["make it green"]]  # one image: the batch shrinks to the work
    np.testing.assert_array_equal(_read(kept), marker)
    expected = RecordingEditor.apply(Image.open(out / "303/303_iter_2.png"), "make it green")
    np.testing.assert_array_equal(_read(out / "303/303_iter_3.png"), expected)
    assert not stale.exists() and not list(out.rglob(".*"))  # no temporary files left


def test_a_folder_edited_with_other_settings_is_refused(tmp_path):
    settings = {"model": "m", "steps": 3, "seed": 0}
    magicbrush.check_settings(tmp_path, settings)
    magicbrush.check_settings(tmp_path, dict(settings))
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        magicbrush.check_settings(tmp_path, {**settings, "seed": 1})


# -- the metrics ------------------------------------------------------------------------------


def test_metrics_follow_the_script(scorer, clip_folder, dino_folder):
    """Against the script's computation written out by hand: torchvision's resize (shorter
    side, int() of the longer) and centre crop (offsets rounded half to even), on known sizes."""
    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    generated = Image.fromarray(_pixels(1, (48, 40)))
    target = Image.fromarray(_pixels(2, (32, 32), high=200))
    shifted = Image.fromarray(np.asarray(target) + 10)
    caption = "a red &amp; blue square"  # clip.tokenize unescapes HTML before the BPE
    got = scorer.score([generated, target, shifted], [target, target, target], [caption] * 3)

    # L1 / L2: the generated image resized to the target's size (bicubic), [0, 1] values.
    resized = np.asarray(generated.resize((32, 32), Image.BICUBIC), np.float64) / 255
    diff = resized - np.asarray(target, np.float64) / 255
    assert got[0]["l1"] == pytest.approx(np.abs(diff).mean(), rel=1e-6)
    assert got[0]["l2"] == pytest.approx((diff**2).mean(), rel=1e-6)
    assert (got[1]["l1"], got[1]["l2"]) == (0.0, 0.0)
    assert got[2]["l1"] == pytest.approx(10 / 255, rel=1e-6)
    assert got[2]["l2"] == pytest.approx((10 / 255) ** 2, rel=1e-5)

    def tensor(image, mean, std):
        x = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]
        return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    clip = CLIPModel.from_pretrained(str(clip_folder)).eval()
    tokens = CLIPTokenizer.from_pretrained(str(clip_folder))(
        ["a red & blue square"], padding="max_length", max_length=77, return_tensors="pt"
    )
    clip_stats = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    dino = ViTModel.from_pretrained(str(dino_folder), layer_norm_eps=1e-6).eval()  # DINO's
    assert scorer.dino.model.config.layer_norm_eps == 1e-6
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    def pooled(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        # CLIP (32 px): 48x40 -> 38x32, crop x 3..35; 32x32 stays.
        clip_gen = generated.resize((38, 32), Image.BICUBIC).crop((3, 0, 35, 32))
        e_gen, e_tgt = (
            pooled(clip.get_image_features(pixel_values=tensor(im, *clip_stats)))
            for im in (clip_gen, target)
        )
        e_text = pooled(clip.get_text_features(**tokens))
        # DINO: 48x40 -> 307x256, crop from (round(41.5) = 42, 16); 32x32 -> 256, crop 16.
        dino_gen = generated.resize((307, 256), Image.BICUBIC).crop((42, 16, 266, 240))
        dino_tgt = target.resize((256, 256), Image.BICUBIC).crop((16, 16, 240, 240))
        d_gen, d_tgt = (
            dino(pixel_values=tensor(im, *imagenet)).last_hidden_state[:, 0]
            for im in (dino_gen, dino_tgt)
        )
    expected = {
        "clip_i": F.cosine_similarity(e_gen, e_tgt),
        "clip_t": F.cosine_similarity(e_gen, e_text),
        "clip_t_oracle": F.cosine_similarity(e_tgt, e_text),
        "dino": F.cosine_similarity(d_gen, d_tgt),
    }
    for name, value in expected.items():
        assert got[0][name] == pytest.approx(float(value[0]), abs=1e-5), name
    assert got[1]["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert got[1]["dino"] == pytest.approx(1.0, abs=1e-6)
    assert got[1]["clip_t"] == pytest.approx(got[1]["clip_t_oracle"], abs=1e-6)
    assert abs(got[0]["clip_i"] - 1.0) > 1e-3  # a different image scores differently


FINALS = {"101": "101/101_1.png", "202": "202/202_iter_2.png", "303": "303/303_iter_3.png"}
SINGLES = {
    ("101", 1): "101/101_1.png",
    ("202", 1): "202/202_1.png",
    ("202", 2): "202/202_inde_2.png",
    ("303", 1): "303/303_1.png",
    ("303", 2): "303/303_inde_2.png",
    ("303", 3): "303/303_inde_3.png",
}


def test_scores_pair_each_setting_with_its_targets(data, scorer, tmp_path):
    """Single-turn scores every turn's independent edit, multi-turn each session's last
    iterative edit, each against its own target, whatever the chunking."""
    from ip2p_jax.evaluation.magicbrush_metrics import distances

    sessions = read_layout(data)
    targets = {(s.name, t.number): t.target for s in sessions for t in s.turns}
    out = tmp_path / "images"
    magicbrush.generate(sessions, RecordingEditor(), out)
    result = magicbrush.score(sessions, out, scorer, chunk=2)
    whole = magicbrush.score(sessions, out, scorer, chunk=64)
    for setting, row in result["summary"].items():
        assert row == pytest.approx(whole["summary"][setting], abs=1e-6)

    def l1(generated: str, target: Path) -> float:
        return distances(Image.open(out / generated), Image.open(target))[0]

    singles = [l1(path, targets[key]) for key, path in SINGLES.items()]
    finals = [l1(path, targets[name, len(SESSIONS[name][1])]) for name, path in FINALS.items()]
    summary = result["summary"]
    assert summary["single_turn"]["count"] == 6 and summary["multi_turn"]["count"] == 3
    assert summary["single_turn"]["l1"] == pytest.approx(np.mean(singles))
    assert summary["multi_turn"]["l1"] == pytest.approx(np.mean(finals))
    assert summary["single_turn"]["l1"] != pytest.approx(summary["multi_turn"]["l1"])


# -- the command ------------------------------------------------------------------------------


def test_cli_end_to_end(data, clip_folder, dino_folder, pipe, tmp_path, monkeypatch, capsys):
    import ip2p_jax.pipelines.auto as auto

    loads = []

    def shared(model, **options):
        loads.append(model)
        return pipe  # the module's pipeline: one load and one compile for the file

    monkeypatch.setattr(auto, "load_edit_pipeline", shared)
    out = tmp_path / "out"
    argv = ["eval", "magicbrush", "--data", str(data), "--out", str(out), "--clip"]
    argv += [str(clip_folder), "--dino", str(dino_folder), "--steps", str(STEPS)]
    argv += ["--batch-size", str(BATCH)]
    assert main(argv) == 0
    assert len(loads) == 1
    report = json.loads((out / "metrics.json").read_text())
    summary = report["summary"]
    assert summary["single_turn"]["count"] == 6 and summary["multi_turn"]["count"] == 3
    for setting, row in summary.items():
        assert METRIC_NAMES <= set(row), setting
        rows = [e for e in report["examples"] if e["setting"] == setting]
        for name in METRIC_NAMES:
            assert row[name] == pytest.approx(np.mean([e[name] for e in rows]))
        assert 0 < row["l1"] < 1 and -1 <= row["clip_i"] <= 1 and -1 <= row["dino"] <= 1
    finals = {
        e["session"]: e["generated"] for e in report["examples"] if e["setting"] == "multi_turn"
    }
    assert finals == FINALS
    images = out / "images"
    assert sorted(p.name for p in (images / "303").iterdir()) == [
        "303_1.png",
        "303_inde_2.png",
        "303_inde_3.png",
        "303_iter_2.png",
        "303_iter_3.png",
    ]
    assert Image.open(images / "202/202_1.png").size == (64, 64)  # the script's fit at 64 px
    # Multi-turn turn 2 is the model's edit of its own turn 1 (same batch shape: no compile).
    editor = magicbrush.pipeline_editor(
        pipe,
        steps=STEPS,
        text_scale=3.0,
        image_scale=1.5,
        sampler="euler_ancestral",
        seed=0,
        resolution=64,
    )
    again = editor(
        [Image.open(images / "303/303_1.png").convert("RGB")] * BATCH, ["move it left"] * BATCH
    )
    diff = np.abs(np.asarray(again[0], np.int16) - _read(images / "303/303_iter_2.png"))
    assert diff.max() <= 1  # equal here; one level of slack for another CPU's rounding
    table = capsys.readouterr().out
    assert "single_turn" in table and "multi_turn" in table and "clip_t_oracle" in table

    # A rerun finds every image and loads no model; other settings are refused.
    def no_load(*args, **kwargs):
        raise AssertionError("nothing to edit: no model should load")

    monkeypatch.setattr(auto, "load_edit_pipeline", no_load)
    assert main(argv) == 0
    assert "edited 0 images (9 were there already)" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["summary"] == summary
    assert main(argv + ["--seed", "1"]) == 2
    assert "other settings (seed: 0 -> 1)" in capsys.readouterr().err
