"""Pictures of the built-in scenes for the README: captioned scenes and editing triples (test split, 32 px).

.venv/bin/python docs/scenes/make_figures.py    # writes docs/scenes/captions.png and edits.png
"""

from pathlib import Path

from snce.data.scenes import SceneCaptions, SceneEdits, labelled_sheet

OUT = Path(__file__).parent


def main() -> None:
    scenes = SceneCaptions(32, 8, split="test")
    rows = [[scenes[i][0]] for i in range(8)]
    labels = [
        scenes.caption(i) + ("  [held-out combination]" if scenes.held_out(i) else "")
        for i in range(8)
    ]
    labelled_sheet(rows, labels, headers=["image", "caption"]).save(OUT / "captions.png")

    edits = SceneEdits(32, 64, split="test")
    picked, kinds = [], {}
    for i in range(64):  # two edits of each kind
        kind = edits.triple(i)[1].kind
        if kinds.get(kind, 0) < 2:
            kinds[kind] = kinds.get(kind, 0) + 1
            picked.append(i)
    rows = [[edits[i]["source"], edits[i]["target"]] for i in picked]
    labels = [
        edits.instruction(i) + ("  [held-out combination]" if edits.held_out(i) else "")
        for i in picked
    ]
    labelled_sheet(rows, labels, headers=["source", "target", "instruction"]).save(
        OUT / "edits.png"
    )


if __name__ == "__main__":
    main()
