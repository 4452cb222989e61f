"""Report documents and their writers, the expert map, and runs you can list, show and re-render.

The browser test loads a tiny study's report.html in headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium): no console error, every token of the expert map drawn, the
layer switch recolours them as the stored routing says, hovering shows a token's labels, and the
label filter dims the others. A second one loads a map with an off-distribution part (a depth-routed
MoE, and the same with its shifted routing shuffled) and switches its tabs by keyboard. Set
TOYLAB_SCREENSHOT_DIR to keep their screenshots.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from toylab.analysis.expert_map import N_SHOWN, matched_clusters, ood_map, ood_view, routing_view, write_expert_map
from toylab.analysis.ood import ood_routing, summarize_ood
from toylab.cli import app
from toylab.report import Document, ExpertMap, Figure, Section, Table, Text, to_html, to_markdown
from toylab.errors import ToylabError
from toylab.formatting import TERMINAL_WIDTH, plain_text, terminal_summary
from toylab.report import contingency_heatmaps, interval_bars, interval_lines, training_curves
from toylab.schema import results_schema, validate_results
from toylab.registry import get_task
from toylab.study import StudyOutcome, run_study
from toylab.training import build_model

TINY = {"competence": 0, "seeds": 2, "train": {"steps": 16, "n_train": 128, "n_val": 32, "eval_every": 8}, "n_eval": 24,
        "n_permutations": 20, "model": {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 2},
        "task_options": {"max_length": 12}}
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


@pytest.fixture(scope="module")
def tiny_outcome(tmp_path_factory, checked_figures) -> StudyOutcome:
    return run_study("expert-specialization", TINY, out=tmp_path_factory.mktemp("runs"), progress=False, workers=1)


@pytest.fixture(scope="module")
def tiny_run(tiny_outcome) -> Path:
    return tiny_outcome.directory


@pytest.fixture(scope="module")
def ood_page(tmp_path_factory) -> Path:
    """A folder with `expert_map.json` and `report.html` of a map with an off-distribution part: seed "planted" is an
    MoE routed by `depth`, in and off distribution; seed "shuffled" is the same model with its off-distribution
    routing label shuffled among the tokens (the labels shown stay true)."""
    task = get_task("brackets")
    shifted = task.shifted()
    model = build_model(task, {"ffn": "moe", "router": "label", "router_label": "depth", "n_experts": 4, "d_model": 16,
                               "n_heads": 2, "d_mlp": 32, "n_layers": 1, "max_len": shifted.seq_len})
    batch, shifted_batch = task.sample_split(60, 1, "heldout"), task.shifted_sample(60, 2)
    found = {"planted": ood_routing(model, task, batch, shifted, shifted_batch, 20, 0, ["depth", "stack_top"])}
    views = {"planted": ood_view(model, task, shifted, shifted_batch, found["planted"], N_SHOWN, 0)}
    depth = shifted_batch.labels["depth"]
    shuffled = depth.copy()
    shuffled[depth != -1] = np.random.default_rng(0).permutation(depth[depth != -1])
    route = model.route_input
    model.route_input = lambda labels: torch.from_numpy(shuffled) if labels is shifted_batch.labels else route(labels)
    found["shuffled"] = ood_routing(model, task, batch, shifted, shifted_batch, 20, 0, ["depth", "stack_top"])
    views["shuffled"] = ood_view(model, task, shifted, shifted_batch, found["shuffled"], N_SHOWN, 0)
    del model.route_input
    folder = tmp_path_factory.mktemp("ood-map")
    summary = summarize_ood(list(found.values()))["labels"]
    write_expert_map(folder / "expert_map.json", task, batch, {seed: routing_view(model, task, batch, N_SHOWN, 0) for seed in views},
                     4, 1, ood=ood_map(shifted, shifted_batch, "m=6", views, summary))
    (folder / "report.html").write_text(to_html(Document("OOD", [Section("Map", [ExpertMap("expert_map.json")])]), folder))
    return folder


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        app(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def document() -> Document:
    return Document("A `study`", [
        Text("**Bottom line.** it works"),
        Section("Results", [Table([{"a": 1, "b \\| c": "`x`"}], caption="numbers"),
                            Section("Deeper", [Figure("figures/f.png", "a figure")])]),
        Section("Map", [ExpertMap("expert_map.json")]),
    ])


def test_markdown_writer_nests_sections_and_points_to_the_html_for_the_map() -> None:
    text = to_markdown(document())
    assert text.startswith("# A `study`\n\n**Bottom line.** it works\n\n## Results\n\nnumbers\n\n| a | b \\| c |")
    assert "### Deeper\n\n#### a figure\n\n![a figure](figures/f.png)" in text
    assert "## Map\n\n### Expert map" in text and "`report.html`" in text and "`expert_map.json`" in text


def test_html_writer_inlines_figures_and_data_and_fetches_nothing(tmp_path) -> None:
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "f.png").write_bytes(PNG)
    data = {"layers": ["0"], "n_experts": 2, "labels": {}, "sequences": [], "grids": None, "seeds": {}, "note": "</script><b>"}
    (tmp_path / "expert_map.json").write_text(json.dumps(data))
    html = to_html(document(), tmp_path)
    assert f'src="data:image/png;base64,{base64.b64encode(PNG).decode()}"' in html
    assert "<table>" in html and "<th>b | c</th>" in html and "<td><code>x</code></td>" in html
    assert '<h1>A <code>study</code></h1>' in html and "<strong>Bottom line.</strong>" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "<link" not in html  # nothing to fetch
    assert html.count("</script>") == 2 and "<\\/script>" not in html  # the data cannot close its script tag
    payload = re.search(r'<script type="application/json" id="expert-map-1-data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(payload) == data
    (tmp_path / "figures" / "f.png").unlink()
    assert "Figure <code>figures/f.png</code> is missing" in to_html(document(), tmp_path)


def test_matched_clusters_rename_a_permuted_partition_to_the_experts() -> None:
    rng = np.random.default_rng(0)
    experts = rng.integers(4, size=2000)
    permuted = np.array([2, 0, 3, 1])[experts]  # planted: the same partition under other names
    assert (matched_clusters(permuted, experts, 4) == experts).all()
    noise = rng.integers(4, size=2000)  # control: unrelated clusters stay unrelated, only renamed one to one
    renamed = matched_clusters(noise, experts, 4)
    assert len(set(zip(noise.tolist(), renamed.tolist()))) == 4 and abs((renamed == experts).mean() - 0.25) < 0.05


def test_maze_grid_geometry_matches_the_maze_read_back_from_the_tokens() -> None:
    from toylab.registry import get_task

    task = get_task("gridworld", {"size": 3, "canvas": 4, "pause": 2})
    batch = task.sample(20, seed=3)
    assert get_task("brackets").grid(batch.inputs) is None  # the default: no grid
    for grid, (maze, start, goal), tokens in zip(task.grid(batch.inputs), task.mazes(batch.inputs), batch.inputs):
        assert grid["size"] == 4 and tuple(grid["start"]) == start and tuple(grid["goal"]) == goal
        assert {frozenset([(a, b), (c, d)]) for a, b, c, d in grid["edges"]} == {frozenset(edge) for edge in maze.edges}
        cells = [(r, c) for _, r, c in grid["path"]]
        assert cells[0] == start and cells[-1] == goal and all(maze.has_edge(u, v) for u, v in zip(cells, cells[1:]))
        assert [task.vocab[tokens[p]] for p, _, _ in grid["path"]] == [f"({r},{c})" for r, c in cells]


def test_the_ood_map_marks_a_planted_routing_as_agreeing_everywhere_and_a_shuffled_one_not(ood_page) -> None:
    data = json.loads((ood_page / "expert_map.json").read_text())
    ood = data["ood"]
    assert ood["labels"]["depth"] == ["0", "1", "2", "3", "4", "5", "6"] and len(ood["sequences"]) == N_SHOWN
    for seed, layers in ood["seeds"].items():
        for layer, view in layers.items():
            depth = view["map"]["depth"]
            assert depth["class_experts"] == [0, 1, 2, 3, 0, -1, -1]  # the label router's map; depths 5, 6 never occur in distribution
            marks = [m for sequence in depth["agrees"] for m in sequence]
            classes = [c for sequence in ood["sequences"] for c in sequence["labels"]["depth"]]
            assert len(marks) == len(classes) and all((m == -1) == (c < 0 or c >= 5) for m, c in zip(marks, classes))
            mapped = [m for m in marks if m >= 0]
            if seed == "planted":  # positive control: every mapped token agrees, every class entirely
                assert set(mapped) == {1} and depth["class_agreement"] == [1.0] * 5 + [None] * 2
            else:  # negative control: shuffled routing off-distribution disagrees for many tokens
                assert mapped.count(0) > len(mapped) / 3 and max(depth["class_agreement"][:5]) < 1.0
    summary = ood["agreement"]["0"]["depth"]  # the study's numbers over both "seeds", as its report prints them
    assert summary["in"].startswith("1.000 ") and float(summary["off"].split()[0]) < 1 and summary["holds"] == "inconclusive"


def test_study_writes_an_html_report_with_every_figure_and_the_expert_map(tiny_run) -> None:
    markdown, html = (tiny_run / "report.md").read_text(), (tiny_run / "report.html").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(figures) >= 3
    for path in figures:
        assert f'src="data:image/png;base64,{base64.b64encode((tiny_run / path).read_bytes()).decode()}"' in html
    assert "## Verdicts" in markdown and "## Time" in markdown and "## Expert map" in markdown
    for heading in ("Verdicts", "Results", "Controls", "Time"):
        assert re.search(rf"<h2>{heading}</h2>", html)
    data = json.loads((tiny_run / "expert_map.json").read_text())
    assert len(data["sequences"]) == 16 and set(data["seeds"]) == {"0", "1"} and data["layers"] == ["0", "1"]
    results = json.loads((tiny_run / "results.json").read_text())
    for seed in data["seeds"].values():
        for layer in seed.values():
            for sequence, experts, probs, clusters in zip(data["sequences"], layer["experts"], layer["probs"], layer["kmeans"]):
                assert len(experts) == len(probs) == len(clusters) == len(sequence["tokens"])
                probs = np.array(probs)
                chosen = probs[np.arange(len(probs)), np.array(experts)[:, 0]]
                assert np.allclose(probs.sum(1), 1, atol=0.01) and (chosen == probs.max(1)).all()  # top-1: the likeliest (3 decimals)
                assert 0 <= min(clusters) and max(clusters) < data["n_experts"]
    assert set(data["labels"]) == set(results["specialization"]["0"])
    first = data["sequences"][0]
    assert first["tokens"][0] == "<bos>" and data["labels"]["token_type"][first["labels"]["token_type"][0]] == "<bos>"


def test_runs_list_show_and_report(tiny_run, capsys) -> None:
    code, out, _ = cli(capsys, "runs", "list", "--out", str(tiny_run.parent.parent))
    header, line = out.splitlines()
    assert header.split()[:2] == ["study", "task"]
    assert code == 0 and line.split()[:2] == ["expert-specialization", "brackets"] and tiny_run.name in line and "finished" in line
    assert "layer " in line and "routing vs k-means" in line
    code, out, _ = cli(capsys, "runs", "show", str(tiny_run))
    assert code == 0 and "| layer | label |" in out and str(tiny_run / "report.html") in out
    before = (tiny_run / "report.md").read_text()
    (tiny_run / "report.html").unlink()
    shutil.rmtree(tiny_run / "figures")
    code, out, _ = cli(capsys, "report", str(tiny_run))
    assert code == 0 and str(tiny_run / "report.html") in out
    assert (tiny_run / "report.md").read_text() == before  # the same report, from the stored results alone
    assert (tiny_run / "report.html").is_file() and (tiny_run / "figures" / "nmi_comparison.png").is_file()


def test_report_refuses_what_is_not_a_finished_run(tiny_run, tmp_path, capsys) -> None:
    code, _, err = cli(capsys, "report", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is not a study run" in err
    unfinished = tmp_path / "out" / "expert-specialization" / "unfinished"
    unfinished.mkdir(parents=True)
    shutil.copy(tiny_run / "config.json", unfinished)
    code, _, err = cli(capsys, "report", str(unfinished))
    assert code == 2 and "no results.json" in err and not (unfinished / "report.md").exists()
    corrupt = tmp_path / "out" / "expert-specialization" / "corrupt"
    shutil.copytree(tiny_run, corrupt, ignore=shutil.ignore_patterns("models"))
    (corrupt / "results.json").write_text('{"specialization": ')
    reports = {name: (corrupt / name).read_bytes() for name in ("report.md", "report.html")}
    code, _, err = cli(capsys, "report", str(corrupt))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "corrupt JSON file" in err
    assert {name: (corrupt / name).read_bytes() for name in reports} == reports
    code, out, _ = cli(capsys, "runs", "list", "--out", str(tmp_path / "out"))
    assert code == 0 and len(out.splitlines()) == 3 and " corrupt " in out and "corrupt JSON file" in out and "no results.json" in out
    code, _, err = cli(capsys, "runs", "list", "--out", str(tmp_path / "absent"))
    assert code == 2 and "no such folder" in err


def browser_or_skip():
    """A headless Chromium driven by Selenium; install what is missing where possible, else skip saying why."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "selenium"], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"selenium is not installed and pip could not install it: {done.stderr.strip().splitlines()[-1:]}")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not (chromium and shutil.which("chromedriver")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("Chromium or chromedriver is missing and cannot be installed here (needs root and apt-get: "
                        "apt-get install chromium chromium-driver)")
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]):
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if done.returncode:
                pytest.skip(f"could not install Chromium ({' '.join(command)}): {done.stderr.strip().splitlines()[-1:]}")
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1200"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def no_errors_and_a_screenshot(driver, path: Path) -> None:
    """No error in the browser's console; the page's screenshot at `path`, copied into TOYLAB_SCREENSHOT_DIR if set."""
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe
    assert driver.save_screenshot(str(path))
    if os.environ.get("TOYLAB_SCREENSHOT_DIR"):
        Path(os.environ["TOYLAB_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["TOYLAB_SCREENSHOT_DIR"]) / path.name)


def test_expert_map_in_a_real_browser(tiny_run, tmp_path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    data = json.loads((tiny_run / "expert_map.json").read_text())
    experts = {layer: [e[0] for sequence in data["seeds"]["0"][layer]["experts"] for e in sequence] for layer in data["layers"]}
    assert experts["0"] != experts["1"]  # precondition: the two layers route some token differently
    driver = browser_or_skip()
    try:
        driver.get((tiny_run / "report.html").as_uri())
        tokens = driver.find_elements(By.CSS_SELECTOR, "[data-panel=experts] .tok")
        assert len(tokens) == sum(len(s["tokens"]) for s in data["sequences"])
        assert len(driver.find_elements(By.CSS_SELECTOR, "[data-panel=kmeans] .tok")) == len(tokens)
        assert [int(t.get_attribute("data-id")) for t in tokens] == experts["0"]
        colours = [t.value_of_css_property("background-color") for t in tokens]

        Select(driver.find_element(By.CSS_SELECTOR, "select[data-control=layer]")).select_by_value("1")
        assert [int(t.get_attribute("data-id")) for t in tokens] == experts["1"]
        changed = [i for i, (a, b) in enumerate(zip(experts["0"], experts["1"])) if a != b]
        assert all(tokens[i].value_of_css_property("background-color") != colours[i] for i in changed)

        flat = [(s, p) for s, sequence in enumerate(data["sequences"]) for p in range(len(sequence["tokens"]))]
        s, p = flat[3]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", tokens[3])
        ActionChains(driver).move_to_element(tokens[3]).perform()
        tooltip = driver.find_element(By.ID, "expert-map-tooltip")
        assert tooltip.is_displayed()
        for name, classes in data["labels"].items():
            value = data["sequences"][s]["labels"][name][p]
            if not isinstance(value, list) and value >= 0:
                assert f"{name}={classes[value]}" in tooltip.text
        assert "router probabilities" in tooltip.text
        hovered = tooltip.text

        ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
        assert not tooltip.is_displayed()
        driver.execute_script("arguments[0].focus()", tokens[2])
        ActionChains(driver).send_keys(Keys.TAB).perform()  # the keyboard reaches the next token and shows what hover shows
        assert driver.switch_to.active_element == tokens[3] and tooltip.is_displayed() and tooltip.text == hovered
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()
        assert not tooltip.is_displayed()
        assert driver.find_element(By.CSS_SELECTOR, ".em-legend .em-key").is_displayed()
        assert not driver.find_elements(By.CSS_SELECTOR, "[role=tab]")  # a map without an off-distribution part: no tabs

        wanted = data["labels"]["token_type"].index("<bos>")
        Select(driver.find_element(By.CSS_SELECTOR, "select[data-control=token_type]")).select_by_value(str(wanted))
        shown = [t for t in tokens if "dim" not in t.get_attribute("class").split()]
        assert len(shown) == len(data["sequences"]) and {t.text for t in shown} == {"<bos>"}

        driver.execute_script("document.querySelector('.expert-map-block').scrollIntoView()")
        no_errors_and_a_screenshot(driver, tmp_path / "expert_map.png")
    finally:
        driver.quit()


def test_the_ood_tab_in_a_real_browser(ood_page, tmp_path) -> None:
    """The tabs switch by click and by arrow keys (WAI-ARIA roles, one tab in the Tab order); the off-distribution tab
    draws every shown shifted token coloured by its stored expert, with the stored agreement mark and the study's numbers."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    data = json.loads((ood_page / "expert_map.json").read_text())
    ood = data["ood"]
    driver = browser_or_skip()
    try:
        driver.get((ood_page / "report.html").as_uri())
        tabs = driver.find_elements(By.CSS_SELECTOR, "[role=tablist] [role=tab]")
        panels = driver.find_elements(By.CSS_SELECTOR, "[role=tabpanel]")
        assert [t.text for t in tabs] == ["In distribution", "Off distribution (m=6)"] and len(panels) == 2
        assert [p.get_attribute("aria-labelledby") for p in panels] == [t.get_attribute("id") for t in tabs]
        assert [t.get_attribute("aria-controls") for t in tabs] == [p.get_attribute("id") for p in panels]

        def selected() -> list[tuple[str, str, bool]]:
            return [(t.get_attribute("aria-selected"), t.get_attribute("tabindex"), p.is_displayed()) for t, p in zip(tabs, panels)]

        assert selected() == [("true", "0", True), ("false", "-1", False)]
        tokens = panels[1].find_elements(By.CSS_SELECTOR, "[data-panel=experts] .tok")
        assert len(tokens) == sum(len(s["tokens"]) for s in ood["sequences"]) and not tokens[0].is_displayed()

        def chips() -> list[tuple[str, int, int]]:  # every chip's text, expert and mark, in one round trip
            return [tuple(c) for c in driver.execute_script(
                "return Array.from(arguments[0].querySelectorAll('[data-panel=experts] .tok'), "
                "t => [t.innerText, Number(t.dataset.id), Number(t.dataset.agree)])", panels[1])]

        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", tabs[0])
        tabs[0].click()
        ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()  # the keyboard switches to the off-distribution tab
        assert selected() == [("false", "-1", False), ("true", "0", True)] and driver.switch_to.active_element == tabs[1]
        for seed in ("planted", "shuffled"):
            Select(panels[1].find_element(By.CSS_SELECTOR, "select[data-control=seed]")).select_by_value(seed)
            view = ood["seeds"][seed]["0"]
            texts, experts, marks = (list(column) for column in zip(*chips()))
            assert texts == [token for s in ood["sequences"] for token in s["tokens"]]  # the glyph is no part of the text
            assert experts == [e[0] for s in view["experts"] for e in s]
            assert marks == [m for s in view["map"]["depth"]["agrees"] for m in s]
            glyphs = {m: driver.execute_script("return getComputedStyle(arguments[0], '::after').content", tokens[marks.index(m)])
                      for m in set(marks)}
            assert glyphs == ({1: '"✓"', -1: "none"} if seed == "planted" else {1: '"✓"', 0: '"✗"', -1: "none"})
        rows = panels[1].find_elements(By.CSS_SELECTOR, "table[data-table=labels] tr")
        assert [r.text.split()[0] for r in rows[1:]] == list(ood["agreement"]["0"])
        assert ood["agreement"]["0"]["depth"]["off"] in rows[1].text and ood["agreement"]["0"]["depth"]["holds"] in rows[1].text

        wrong = marks.index(0)
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", tokens[wrong])
        ActionChains(driver).move_to_element(tokens[wrong]).perform()
        tooltip = driver.find_element(By.ID, "expert-map-tooltip")
        assert tooltip.is_displayed() and "disagrees with the in-distribution map" in tooltip.text and "✗ disagrees" in tooltip.text

        ActionChains(driver).move_to_element(tabs[0]).perform()
        tabs[1].click()
        ActionChains(driver).send_keys(Keys.HOME).perform()
        assert selected()[0] == ("true", "0", True) and driver.switch_to.active_element == tabs[0]
        ActionChains(driver).send_keys(Keys.ARROW_LEFT).perform()  # wraps around
        assert selected()[1] == ("true", "0", True)
        no_errors_and_a_screenshot(driver, tmp_path / "expert_map_ood.png")
    finally:
        driver.quit()


def test_the_terminal_summary_is_the_bottom_line_then_the_report_table_in_100_columns(tiny_outcome) -> None:
    """Issue 27 §5: what `toylab study run` prints (`terminal_summary` of the outcome) is the report's bottom line, the
    smoke-test warning, and the summary table in the report's row order, every line at most 100 characters."""
    text = terminal_summary(tiny_outcome.report.bottom_line, tiny_outcome.summary, tiny_outcome.report.notes)
    assert max(len(line) for line in text.splitlines()) <= TERMINAL_WIDTH
    bottom_line, smoke, table = text.split("\n\n")
    report = (tiny_outcome.directory / "report.md").read_text()
    written = next(paragraph for paragraph in report.split("\n\n") if paragraph.startswith("**Bottom line.**"))
    assert " ".join(bottom_line.split()) == " ".join(plain_text(written).split())
    assert smoke.startswith("Smoke test. This run sets competence = 0")
    rows = list(csv.reader((tiny_outcome.directory / "tables" / "results.csv").read_text().splitlines()))
    table, left_out = table.split("\n(not shown here, see the report: ")
    shown = [line.split()[:2] for line in table.splitlines()[1:]]
    assert shown == [row[:2] for row in rows[1:]] and len(shown) == 10  # layer and label, as the report orders them
    assert rows[0][:4] == re.split(r"\s{2,}", table.splitlines()[0])[:4] == ["layer", "label", "kind", "routing vs k-means"] and "AMI routing" in " ".join(left_out.split())


def test_every_figure_of_a_study_labels_its_axes_and_keeps_legends_off_the_data(tiny_outcome, checked_figures) -> None:
    assert {"nmi_comparison", "experts_layer0", "experts_layer1", "training_curves"} <= set(checked_figures)
    assert {name: problems for name, problems in checked_figures.items() if problems} == {}


def test_figure_builders_draw_distinct_series_with_labels_and_the_check_sees_the_old_faults(tmp_path, figure_problems) -> None:
    import matplotlib.pyplot as plt
    import pandas as pd

    series = ["MoE routing", "k-means", "k-means (dense)", "balanced k-means", "random linear", "shuffled null", "linear probe", "eighth"]
    frame = pd.DataFrame([{"label": label, "assignment": name, "layer": layer, "mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}
                          for label in ("depth", "position") for name in series for layer in (1, 2)])
    (tmp_path / "a.csv").write_text("step,train_loss,val_acc\n1,2.0,\n2,1.5,0.5\n")
    figures = {
        "bars": interval_bars(frame, "label", "assignment", "layer", "NMI", reference=0.0),
        "lines": interval_lines(frame, "layer", "assignment", "label", "NMI"),
        "heatmaps": contingency_heatmaps({"depth": np.eye(3) + 1}, {"depth": ["0", "1", "2"]}, "layer 0"),
        "curves": training_curves({f"{model}-seed{seed}": tmp_path / "a.csv" for model in ("dense", "moe") for seed in (0, 1)},
                                  ["train_loss", "val_acc"]),
    }
    assert {name: figure_problems(fig) for name, fig in figures.items()} == dict.fromkeys(figures, [])
    legend = figures["curves"].legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["dense", "moe"]  # a model's seeds share a colour
    for fig in figures.values():
        plt.close(fig)
    fig, ax = plt.subplots()  # the figure: seaborn's orange and vermillion, the legend over a bar, no x label
    ax.bar([0], [1], color="#de8f05", label="k-means")
    ax.bar([1], [1], color="#d55e00", label="shuffled null")
    ax.set(title="layer 0", ylabel="NMI")
    ax.legend(loc="center")
    problems = figure_problems(fig)
    plt.close(fig)
    assert problems == ["panel 'layer 0' has no x label", "the legend covers panel 'layer 0'",
                        "series 'k-means' and 'shuffled null' look alike"]


def test_the_expert_map_explains_its_chips_and_answers_the_keyboard(tiny_run) -> None:
    html = (tiny_run / "report.html").read_text()
    key = re.search(r'<p class="em-key">(.*?)</p>', html, re.S).group(1)
    assert "<b>E<i>n</i> / C<i>n</i></b>: expert <i>n</i>" in key and "k-means cluster <i>n</i> of the router input" in key
    assert "Tab to it" in key
    assert 'tabindex: "0"' in html and 'addEventListener("focus"' in html and 'addEventListener("blur"' in html
    assert ".tok:focus-visible" in html and 'role="tooltip"' in html


def test_results_fit_the_schema_and_a_tampered_file_is_one_line_naming_the_key(tiny_run, tmp_path, capsys) -> None:
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(results_schema())
    results = json.loads((tiny_run / "results.json").read_text())
    validate_results(results, "expert-specialization")
    for tamper, message in [
        (lambda r: r["specialization"]["0"]["depth"]["routing_nmi"].update(mean="high"),
         "key 'specialization.0.depth.routing_nmi.mean' must be a number, not a string"),
        (lambda r: r.pop("task"), "key 'task' is missing"),
        (lambda r: r.pop("failed_runs"), "key 'failed_runs' is missing"),
        (lambda r: r["heldout"][0].update(sequences=[1]), "key 'heldout.0.sequences' must be an integer, not an array"),
    ]:
        bad = json.loads(json.dumps(results))
        tamper(bad)
        with pytest.raises(ToylabError, match=re.escape(message)):
            validate_results(bad, "expert-specialization")
    copy = tmp_path / "expert-specialization" / "tampered"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("models"))
    bad = json.loads(json.dumps(results))
    bad["task"]["options"] = "k=2"
    (copy / "results.json").write_text(json.dumps(bad))
    before = (copy / "report.md").read_bytes()
    code, _, err = cli(capsys, "report", str(copy))
    assert code == 2 and err.strip() == f"error: {copy / 'results.json'}: key 'task.options' must be an object, not a string"
    assert (copy / "report.md").read_bytes() == before


class HTMLTables(HTMLParser):
    """The tables of a report page: each `div.table`'s CSV path and its rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[str, list[list[str]]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "div" and ("class", "table") in attrs:
            self.tables.append((dict(attrs)["data-csv"], []))
        elif tag == "tr" and self.tables:
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def test_every_table_of_the_report_is_a_csv_file_with_its_rows(tiny_run) -> None:
    parser = HTMLTables()
    parser.feed((tiny_run / "report.html").read_text())
    assert len(parser.tables) >= 8 and len({path for path, _ in parser.tables}) == len(parser.tables)
    for path, rows in parser.tables:
        assert list(csv.reader((tiny_run / path).read_text().splitlines())) == rows, path
    assert sorted(p.relative_to(tiny_run).as_posix() for p in (tiny_run / "tables").iterdir()) == sorted(p for p, _ in parser.tables)
