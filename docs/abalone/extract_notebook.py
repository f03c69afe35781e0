"""The per-model values Hammoud et al.'s FCNN notebook prints, as a CSV (hammoud_fcnn_notebook.csv).

Source: github.com/HadiHammoud44/CS439_Sharpness, FCNN_model.ipynb at commit
36e9b7d199a39478b6db95e630b75ef6cb84ac36 (the file's last change), its saved outputs:

* the training cell prints, per model and epoch, ``training_loss`` = the MSE on the whole (standardised)
  training set computed before the epoch's last SGD step (53 full-batch steps an epoch; the line marked
  ``#    1`` before "Training Start" is the first epoch). The last line is the loss one step before the
  final weights: ``final_train_loss``. (Its ``test_loss`` field prints the training loss again.)
* the ascent cell prints, per model and pass (6 passes of 53 steps), the negated training MSE computed
  before the pass's last step; ``ascent_loss`` is the last pass's (the loss rises over the passes, so the
  pass with the largest summed loss, whose end the notebook keeps, is the last or within 1e-4 of it).

Neither the clean loss of the final weights, nor the sharpness, nor the test loss is printed; the figure
(``sharpness`` against ``test loss``) is: see digitize_scatter.py.

Usage (from the repository root)::

    git --git-dir <mirror of CS439_Sharpness> show 36e9b7d:FCNN_model.ipynb > /tmp/FCNN_model.ipynb
    python docs/abalone/extract_notebook.py /tmp/FCNN_model.ipynb docs/abalone/hammoud_fcnn_notebook.csv
"""

from __future__ import annotations

import csv
import json
import re
import sys

LOSS = re.compile(r"training_loss=(-?[0-9.]+e[+-][0-9]+),")
MODEL = re.compile(r"^model(\d+)$", re.M)


def stream_text(cell: dict) -> str:
    """The concatenated stdout of a cell (the notebook splits it into several stream outputs)."""
    return "".join("".join(o.get("text", [])) for o in cell["outputs"] if o.get("output_type") == "stream")


def per_model(text: str) -> dict[int, list[float]]:
    """{model index: the printed training_loss values, in order} from a cell's output."""
    parts = MODEL.split(text)
    return {int(parts[k]): [float(v) for v in LOSS.findall(parts[k + 1])] for k in range(1, len(parts), 2)}


def cell_printing(cells: list[dict], marker: str) -> dict:
    """The one code cell whose source contains ``marker``."""
    found = [c for c in cells if c["cell_type"] == "code" and marker in "".join(c["source"])]
    if len(found) != 1:
        raise ValueError(f"expected one code cell containing {marker!r}, found {len(found)}")
    return found[0]


def main(notebook: str, out: str) -> None:
    cells = json.load(open(notebook))["cells"]
    training = per_model(stream_text(cell_printing(cells, "train_network(network, model_name")))
    ascent = per_model(stream_text(cell_printing(cells, "project_weights(network, epsilon)\n")))
    if sorted(training) != list(range(50)) or sorted(ascent) != list(range(50)):
        raise ValueError("expected models 0-49 in both cells")
    with open(out, "w", newline="") as f:
        f.write(
            "# Hammoud et al. (2023), FCNN_model.ipynb at github.com/HadiHammoud44/CS439_Sharpness commit "
            "36e9b7d199a39478b6db95e630b75ef6cb84ac36: printed values (docs/abalone/extract_notebook.py)\n"
        )
        w = csv.writer(f)
        w.writerow(["model", "epochs", "final_train_loss", "ascent_loss", "train_losses", "pass_losses"])
        for m in range(50):
            losses, passes = training[m], [-v for v in ascent[m]]
            if len(passes) != 6:
                raise ValueError(f"model {m}: expected 6 ascent passes, found {len(passes)}")
            w.writerow([m, len(losses), losses[-1], passes[-1], " ".join(map(str, losses)), " ".join(map(str, passes))])


if __name__ == "__main__":
    main(*sys.argv[1:3])
