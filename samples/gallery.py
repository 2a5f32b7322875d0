"""Build the README gallery from the sample scripts: for each method, the first held-out prompts at
seed 0 (fixed before looking at any result), baseline beside the method, written to docs/gallery and
shown in README.md between the gallery markers, each picture linked to its script and to its
BENCHMARKS.md section, with what the numbers there say, so that picture and table tell one story.
Videos are shown as frame strips (a row per video, evenly spaced frames); their GIFs come from the scripts.

    python samples/gallery.py                      # every method, on the shipped models
    python samples/gallery.py --methods astar      # one method's row, the others kept
"""

import argparse
import re
import shlex
import shutil
import tempfile
from pathlib import Path

import astar
import head_perturbation
import long_video
import sparse_attention
import story

from attnsteer.guidance.shapes import prompt_set, video_prompt_set

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- gallery: samples/gallery.py writes this block -->", "<!-- end of gallery -->"
TWO, MOVING = prompt_set("two", "heldout")[:2], video_prompt_set("one-moving", "heldout")[:1]
# name: (title, script, its options, the BENCHMARKS.md heading of its numbers, what they say)
METHODS = {
    "heads": ("Head perturbation guidance (shapes-sd3, the found heads)", head_perturbation, ["--prompts", *TWO],
              "The held-out result: searching at w = 0.5",
              "held-out two-object prompts: bound +0.026 [+0.009, +0.044] over no perturbation (1200 pairs)"),
    "astar": ("A-STAR (shapes-sd, alpha 5; in the maps, top row baseline, bottom row A-STAR)", astar, ["--prompts", *TWO], "A-STAR (issue 11): quality on shapes-sd",
              "held-out two-object prompts: binding +0.037 [+0.001, +0.073], coverage +0.015 [-0.036, +0.066]"),
    "story": ("IR-Diffusion (shapes-sd3, the detector's subject masks)", story,
              ["--model", "shapes-sd3", "--masks", "detector", "--scenes", TWO[0]],
              "IR-Diffusion as its authors run it (issue 28): the rows again",
              "held-out two-object scenes: consistency -0.054 [-0.095, -0.012] against independent generation (150 pairs): "
              "IR does not beat it here"),
    "sparse": ("Block-sparse attention (shapes-wan, blocks of 4 x 4 tokens as measured)", sparse_attention,
               ["--prompts", *MOVING, "--pool", "4", "4", "--tile", "3", "1", "1"],
               "On shapes-wan: fidelity to dense and the video metrics at 200 videos (issue 32)",
               "200 held-out videos: Draft 0.75 with its dense warm-up 31 dB from dense, binding -0.005 [-0.010, -0.000]; "
               "Draft 0.9 binding -0.157 [-0.189, -0.125]; Radial as Draft 0.5; no faster on this CPU at 1088 tokens"),
    "long": ("Long video: direct, FIFO-Diffusion, FIFO + Ouroboros (shapes-wan, 4x its clip)", long_video,
             ["--prompt", MOVING[0], "--frames", "65"],
             "Long video on shapes-wan against direct generation (issue 32, first rows: 4 videos, not the 200 asked)",
             "4 held-out videos at 4x the clip: identity over direct +0.154 [+0.143, +0.165] with FIFO and lookahead, "
             "+0.162 [+0.148, +0.176] with Ouroboros, whose object stands still (direction followed in 0 of 8 windows)"),
}


def anchor(heading: str) -> str:
    """GitHub's link anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def row(name: str, pictures: list[Path]) -> str:
    """The gallery's markdown for one method: its title, pictures, and the links to its script and numbers."""
    title, script, options, heading, says = METHODS[name]
    shown = " ".join(f"[![{title}](docs/gallery/{p.name})](samples/{Path(script.__file__).name})" for p in pictures)
    return (f"**{title}**: `{shlex.join(['python', f'samples/{Path(script.__file__).name}', *options])}`; "
            f"[BENCHMARKS.md](BENCHMARKS.md#{anchor(heading)}): {says}.\n\n{shown}\n")


def replace_block(readme: str, rows: dict[str, str]) -> str:
    """README text with the gallery block holding ``rows`` (in METHODS order) and the other rows it had."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md has no gallery block: put {BEGIN!r} and {END!r} where it goes")
    head, rest = readme.split(BEGIN, 1)
    block, tail = rest.split(END, 1)
    kept = dict(re.findall(r"<!-- (\w+) -->\n(.*?)(?=<!-- \w+ -->\n|\Z)", block, re.S))
    kept.update(rows)
    body = "".join(f"<!-- {name} -->\n{kept[name].strip()}\n\n" for name in METHODS if name in kept)
    return f"{head}{BEGIN}\n{body}{END}{tail}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--dest", default=str(ROOT / "docs" / "gallery"))
    args = p.parse_args(argv)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.methods:
        _, script, options, _, _ = METHODS[name]
        with tempfile.TemporaryDirectory() as tmp:
            made = [p.with_name(f"{p.stem}_strip.png") if p.suffix == ".gif" else p  # a video's frame strip
                    for p in script.main(options + ["--out", tmp])]
            rows[name] = row(name, [Path(shutil.copyfile(path, dest / f"{name}_{path.name}")) for path in made])
    readme = Path(args.readme)
    readme.write_text(replace_block(readme.read_text(), rows))
    total = sum(f.stat().st_size for f in dest.iterdir())
    print(f"gallery: {', '.join(args.methods)} in {dest} ({total / 1024:.0f} KB in all) and {readme}")


if __name__ == "__main__":
    main()
