// Expert map: tokens coloured by their routed expert at a selectable layer, beside their k-means cluster.
// Data (inlined JSON, see toylab/analysis/expert_map.py): sequences with tokens and labels, and per seed and
// layer the chosen experts, router probabilities and k-means clusters (matched to experts) of every token.
// With an `ood` part, two tabs: in distribution, and the shifted sequences with each token's agreement with the
// in-distribution class -> expert map (a mark on its chip, and in the details) and the study's agreement numbers.
(function () {
  "use strict";
  const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7",
                   "#9c755f", "#bab0ac", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#17becf"];
  const tooltip = document.getElementById("expert-map-tooltip");
  function hide() { tooltip.hidden = true; }
  document.addEventListener("keydown", event => { if (event.key === "Escape") hide(); });

  function colour(id) { return id < 0 ? "#dddddd" : PALETTE[id % PALETTE.length]; }  // -1: no expert
  function textColour(id) { return id >= 0 && [0, 3, 4, 8, 10, 11, 13, 14].includes(id % PALETTE.length) ? "#fff" : "#000"; }
  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value; else node.setAttribute(key, value);
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }
  function select(name, options, onChange) {
    const box = el("select", {"data-control": name});
    for (const [value, text] of options) box.appendChild(el("option", {value: value, text: text}));
    box.addEventListener("change", onChange);
    return el("label", {}, [document.createTextNode(name + " "), box]);
  }
  function classOf(value, classes) {
    if (Array.isArray(value)) return value.length ? value.map(c => classes[c]).join("+") : "none";
    return value < 0 ? null : classes[value];
  }
  function hasClass(value, wanted) {
    return Array.isArray(value) ? value.includes(wanted) : value === wanted;
  }

  const MARKS = {"1": "agrees with the in-distribution map", "0": "disagrees with the in-distribution map",
                 "-1": "its class is not in the in-distribution map"};

  // One view of the map in `root`: `source` (the map itself, or its `ood` part) holds the sequences, labels and
  // routing per seed; `data` the experts and layers; `key` the page's explanation of the chips, put in the legend.
  function view(root, data, source, key) {
    const seeds = Object.keys(source.seeds), layers = data.layers, labels = Object.keys(source.labels);
    const ood = "agreement" in source;
    const marked = ood ? Object.keys(source.seeds[seeds[0]][layers[0]].map) : [];
    const state = {seed: seeds[0], layer: layers[0], filters: {}, marked: marked[0]};
    const controls = el("div", {class: "em-controls"});
    controls.appendChild(select("seed", seeds.map(s => [s, s]), e => { state.seed = e.target.value; paint(); }));
    controls.appendChild(select("layer", layers.map(l => [l, l]), e => { state.layer = e.target.value; paint(); }));
    if (ood) controls.appendChild(select("agreement", marked.map(name => [name, name]), e => { state.marked = e.target.value; paint(); }));
    for (const name of labels) {
      const options = [["", "any"]].concat(source.labels[name].map((c, i) => [String(i), c]));
      controls.appendChild(select(name, options, e => {
        if (e.target.value === "") delete state.filters[name]; else state.filters[name] = Number(e.target.value);
        paint();
      }));
    }
    const legend = el("div", {class: "em-legend"});
    for (let e = 0; e < data.n_experts; e++) {
      const chip = el("span", {text: "E" + e + " / C" + e});
      chip.style.background = colour(e); chip.style.color = textColour(e);
      legend.appendChild(chip);
    }
    if (key) legend.appendChild(key);
    const numbers = el("div", {class: "em-agreement"});
    const panels = el("div", {class: "em-panels"});
    const views = {experts: [], kmeans: []};
    for (const [kind, title] of [["experts", "Routed expert (top-1)"], ["kmeans", "k-means cluster of the router input"]]) {
      const panel = el("div", {class: "em-panel", "data-panel": kind}, [el("h5", {text: title})]);
      source.sequences.forEach((sequence, s) => {
        const line = el("div", {class: "em-seq"}, [el("span", {class: "idx", text: "#" + s})]);
        const row = sequence.tokens.map((token, p) => {
          // hover and keyboard focus show the same details: Tab walks the tokens, Escape hides the details
          const span = el("span", {class: "tok", "data-seq": s, "data-pos": p, tabindex: "0", text: token});
          span.addEventListener("mouseenter", event => { show(s, p); move(event); });
          span.addEventListener("mousemove", move);
          span.addEventListener("mouseleave", hide);
          span.addEventListener("focus", () => { show(s, p); const box = span.getBoundingClientRect(); place(box.left, box.bottom); });
          span.addEventListener("blur", hide);
          line.appendChild(span);
          return span;
        });
        views[kind].push(row);
        panel.appendChild(line);
      });
      panels.appendChild(panel);
    }
    const grids = el("div", {class: "em-grids"});
    root.append(controls, legend, numbers, grids, panels);

    function matches(s, p) {
      const values = source.sequences[s].labels;
      return Object.entries(state.filters).every(([name, wanted]) => hasClass(values[name][p], wanted));
    }
    function paint() {
      const routed = source.seeds[state.seed][state.layer];
      for (const kind of ["experts", "kmeans"]) {
        views[kind].forEach((row, s) => row.forEach((span, p) => {
          const id = kind === "experts" ? routed.experts[s][p][0] : routed.kmeans[s][p];
          span.style.background = colour(id);
          span.style.color = textColour(id);
          span.dataset.id = id;
          span.classList.toggle("dim", !matches(s, p));
          if (ood && kind === "experts") span.dataset.agree = routed.map[state.marked].agrees[s][p];
        }));
      }
      if (ood) tabulate(routed.map[state.marked]);
      if (source.grids) drawGrids(routed);
    }
    function expertName(e) { return e < 0 ? "not in the map" : e >= data.n_experts ? "no expert" : "E" + e; }
    // The study's agreement per label at this layer (over seeds), and this seed's map and agreement per class.
    function tabulate(map) {
      const row = (cells, tag) => el("tr", {}, cells.map(text => el(tag || "td", {text: String(text)})));
      const study = Object.entries(source.agreement[state.layer]).map(([name, a]) =>
        row([name + (name === state.marked ? " ◀" : ""), a.in, a.off, a.null, a.holds]));
      const classes = source.labels[state.marked].map((c, i) => row([c, expertName(map.class_experts[i]),
        map.class_agreement[i] === null ? "n/a" : map.class_agreement[i].toFixed(3)]));
      numbers.replaceChildren(
        el("table", {"data-table": "labels"}, [el("caption", {text: "Agreement with the in-distribution class → expert map, layer " + state.layer + " (the study's numbers, mean [95% CI] over seeds)"}),
          row(["label", "in distribution", "off distribution", "shuffled null", "map holds"], "th")].concat(study)),
        el("table", {"data-table": "classes"}, [el("caption", {text: "Label " + state.marked + ", seed " + state.seed + ": each class's in-distribution expert and the share of its shifted tokens sent there"}),
          row(["class", "in-distribution expert", "agreement off distribution"], "th")].concat(classes)));
    }
    function drawGrids(routed) {
      const NS = "http://www.w3.org/2000/svg", cell = 22;
      grids.replaceChildren();
      source.grids.forEach((grid, s) => {
        const side = grid.size * cell + 2;
        const svg = document.createElementNS(NS, "svg");
        svg.setAttribute("width", side); svg.setAttribute("height", side);
        svg.setAttribute("data-seq", s);
        const add = (tag, attrs) => {
          const node = document.createElementNS(NS, tag);
          for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
          svg.appendChild(node);
          return node;
        };
        add("rect", {x: 1, y: 1, width: grid.size * cell, height: grid.size * cell, fill: "#f4f4f4", stroke: "#333"});
        for (const [pos, r, c] of grid.path) {
          const id = routed.experts[s][pos][0];
          add("rect", {x: 1 + c * cell, y: 1 + r * cell, width: cell, height: cell, fill: colour(id), "data-id": id, class: "em-cell"});
        }
        const open = new Set(grid.edges.map(e => e.join(",")));
        for (let r = 0; r < grid.size; r++) for (let c = 0; c < grid.size; c++) {
          if (c + 1 < grid.size && !open.has([r, c, r, c + 1].join(",")))
            add("line", {x1: 1 + (c + 1) * cell, y1: 1 + r * cell, x2: 1 + (c + 1) * cell, y2: 1 + (r + 1) * cell, stroke: "#333", "stroke-width": 2});
          if (r + 1 < grid.size && !open.has([r, c, r + 1, c].join(",")))
            add("line", {x1: 1 + c * cell, y1: 1 + (r + 1) * cell, x2: 1 + (c + 1) * cell, y2: 1 + (r + 1) * cell, stroke: "#333", "stroke-width": 2});
        }
        for (const [mark, [r, c]] of [["S", grid.start], ["G", grid.goal]]) {
          const text = add("text", {x: 1 + (c + 0.5) * cell, y: 1 + (r + 0.7) * cell, "text-anchor": "middle", "font-size": 12, "font-weight": "bold"});
          text.textContent = mark;
        }
        grids.appendChild(el("figure", {}, [svg, el("figcaption", {text: "#" + s})]));
      });
    }
    function show(s, p) {
      const sequence = source.sequences[s], seed = source.seeds[state.seed];
      const rows = labels.map(name => [name, classOf(sequence.labels[name][p], source.labels[name])]).filter(r => r[1] !== null);
      const lines = [el("div", {class: "tt-token", text: "token " + JSON.stringify(sequence.tokens[p]) + " (sequence " + s + ", position " + p + ", seed " + state.seed + ")"})];
      lines.push(el("div", {class: "tt-labels", text: "labels: " + rows.map(r => r[0] + "=" + r[1]).join(", ")}));
      if (ood) {
        const map = seed[state.layer].map[state.marked], value = sequence.labels[state.marked][p];
        const mapped = value < 0 ? "no class" : "class " + source.labels[state.marked][value] + " → " + expertName(map.class_experts[value]);
        lines.push(el("div", {class: "tt-agree", text: "agreement of " + state.marked + " at layer " + state.layer + ": " + mapped +
                                                  " in distribution; this token " + MARKS[String(map.agrees[s][p])]}));
      }
      const head = el("tr", {}, [el("th", {text: "layer"}), el("th", {text: "experts"}), el("th", {text: "k-means"}),
                                 el("th", {text: "router probabilities"})].concat(ood ? [el("th", {text: "map of " + state.marked})] : []));
      const body = layers.map(layer => {
        const at = seed[layer];
        return el("tr", {}, [el("td", {text: layer + (layer === state.layer ? " ◀" : "")}),
                             el("td", {text: at.experts[s][p].filter(e => e >= 0).map(e => "E" + e).join(", ") || "none"}),
                             el("td", {text: "C" + at.kmeans[s][p]}),
                             el("td", {text: at.probs[s][p].map((q, e) => "E" + e + " " + q.toFixed(2)).join("  ")})]
                            .concat(ood ? [el("td", {text: {"1": "✓ agrees", "0": "✗ disagrees", "-1": "not in the map"}[String(at.map[state.marked].agrees[s][p])]})] : []));
      });
      lines.push(el("table", {}, [head].concat(body)));
      tooltip.replaceChildren(...lines);
      tooltip.hidden = false;
    }
    function move(event) { place(event.clientX, event.clientY); }
    function place(x, y) {
      tooltip.style.left = Math.min(x + 12, window.innerWidth - tooltip.offsetWidth - 8) + "px";
      tooltip.style.top = (y + 14) + "px";
    }
    paint();
  }

  // Without an `ood` part, the map itself; with one, two tabs (WAI-ARIA tabs: arrow keys, Home and End move between
  // them, the active one alone in the Tab order).
  function build(root, data) {
    const key = root.querySelector(".em-key"), oodKey = root.querySelector(".em-ood-key");  // explanations, from the page
    if (!data.ood) { view(root, data, data, key); return; }
    const tablist = el("div", {role: "tablist", "aria-label": "Inputs of the expert map", class: "em-tabs"});
    const parts = [["in", "In distribution", data, key], ["ood", "Off distribution (" + data.ood.change + ")", data.ood, oodKey]];
    const tabs = [], panels = [];
    for (const [name, title, source, explanation] of parts) {
      const tab = el("button", {role: "tab", type: "button", id: root.id + "-tab-" + name, "aria-controls": root.id + "-panel-" + name,
                                "data-tab": name, text: title});
      const panel = el("div", {role: "tabpanel", id: root.id + "-panel-" + name, "aria-labelledby": tab.id, tabindex: "0",
                               class: "em-tabpanel", "data-view": name});
      tab.addEventListener("click", () => choose(tabs.indexOf(tab)));
      tabs.push(tab); panels.push(panel);
      tablist.appendChild(tab);
      view(panel, data, source, explanation);
    }
    tablist.addEventListener("keydown", event => {
      const now = tabs.indexOf(document.activeElement);
      const next = {ArrowRight: now + 1, ArrowLeft: now - 1 + tabs.length, Home: 0, End: tabs.length - 1}[event.key];
      if (now < 0 || next === undefined) return;
      event.preventDefault();
      choose(next % tabs.length);
      tabs[next % tabs.length].focus();
    });
    function choose(i) {
      hide();
      tabs.forEach((tab, j) => { tab.setAttribute("aria-selected", String(i === j)); tab.tabIndex = i === j ? 0 : -1; panels[j].hidden = i !== j; });
    }
    root.append(tablist, ...panels);
    choose(0);
  }

  for (const root of document.querySelectorAll(".expert-map")) {
    build(root, JSON.parse(document.getElementById(root.id + "-data").textContent));
  }
})();
