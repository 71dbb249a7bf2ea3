// report.html's behaviour, inlined into the page (no network): hovering, focusing or clicking a layer (a box
// of the chain, a table row, a cell of a sweep's grid) shows its details from the page's JSON block, the
// one place the page's numbers come from; a click pins them; a column's header sorts its table.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("probecore-data").textContent);
  const details = document.getElementById("details");
  let pinned = null;
  let shown = null;

  const percent = (value) => (value === null ? "" : (100 * value).toFixed(2) + "%");
  const points = (value) => (value === null ? "" : (100 * value).toFixed(2) + " points");
  const withInterval = ([error, low, high]) => `${percent(error)} (95% interval ${percent(low)} to ${percent(high)})`;

  function layerOf(element) {
    const report = data.reports[Number(element.dataset.report)];
    return [report, report.layers.find((layer) => layer.name === element.dataset.layer)];
  }

  function field(list, name, label, text) {
    const term = document.createElement("dt");
    const value = document.createElement("dd");
    term.textContent = label;
    value.textContent = text;
    value.dataset.field = name;
    list.append(term, value);
  }

  function show(element) {
    if (!element || element === shown) {
      return;
    }
    shown = element;
    const [report, layer] = layerOf(element);
    const list = document.createElement("dl");
    field(list, "name", "layer", layer.name);
    if (report.checkpoint !== null) {
      field(list, "checkpoint", "checkpoint", report.checkpoint);
    }
    field(list, "op", "op", layer.role && layer.role !== "main" ? `${layer.op} (${layer.role})` : layer.op);
    field(list, "shape", "shape per sample", layer.shape);
    field(list, "features", "features used", `${layer.features_used} of ${layer.features}`);
    field(list, "reduction", "reduction", layer.reduction);
    field(list, "l2", "chosen l2", layer.l2 === null ? "" : layer.l2.toExponential(0));
    for (const split of ["train", "valid", "test"]) {
      field(list, `error-${split}`, `${split} error`, withInterval(layer.error[split]));
    }
    field(list, "loss", "loss train / valid / test", ["train", "valid", "test"].map((s) => layer.loss[s]?.toFixed(4) ?? "").join(" / "));
    if (layer.top5_test !== null) {
      field(list, "top5-test", "top-5 test error", percent(layer.top5_test));
    }
    field(list, "selectivity", "control selectivity",
      layer.selectivity === null ? "no control task (probe run --control)" : `${points(layer.selectivity)} (control test error ${percent(layer.control_test)})`);
    if (layer.parents.length) {
      field(list, "parents", "computed from", layer.parents.join(", "));
    }
    const findings = layer.findings.map((index) => report.findings[index]);
    field(list, "findings", "findings", findings.length ? "" : "none");
    const notes = list.lastChild;
    for (const finding of findings) {
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = `${finding.kind.replace("_", " ")}: ${finding.message}`;
      notes.append(note);
    }
    details.replaceChildren(list);
  }

  function pin(element) {
    document.querySelectorAll(".pinned").forEach((other) => other.classList.remove("pinned"));
    pinned = element;
    element.classList.add("pinned");
    show(element);
  }

  // one listener each for the whole page: a sweep's grid may hold thousands of cells
  const target = (event) => event.target.closest?.("[data-layer]") ?? null;
  document.addEventListener("mouseover", (event) => show(target(event) ?? pinned));
  document.addEventListener("focusin", (event) => show(target(event)));
  document.addEventListener("click", (event) => target(event) && pin(target(event)));
  document.addEventListener("keydown", (event) => {
    if ((event.key === "Enter" || event.key === " ") && target(event)) {
      event.preventDefault();
      pin(target(event));
    }
  });

  function sortBy(header) {
    const table = header.closest("table");
    const column = [...header.parentNode.children].indexOf(header);
    const ascending = header.getAttribute("aria-sort") !== "ascending";
    const key = (row) => {
      const cell = row.children[column];
      const value = cell.dataset.value;
      return value === undefined ? cell.textContent : value === "" ? NaN : Number(value);
    };
    const rows = [...table.tBodies[0].rows];
    rows.sort((a, b) => {
      const [x, y] = [key(a), key(b)];
      if (typeof x === "string") {
        return ascending ? x.localeCompare(y) : y.localeCompare(x);
      }
      if (Number.isNaN(x) || Number.isNaN(y)) {
        return Number.isNaN(x) - Number.isNaN(y); // blanks last either way
      }
      return ascending ? x - y : y - x;
    });
    table.tBodies[0].append(...rows);
    table.querySelectorAll("th").forEach((other) => other.removeAttribute("aria-sort"));
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }

  for (const header of document.querySelectorAll("table.sortable th")) {
    header.tabIndex = 0;
    header.addEventListener("click", () => sortBy(header));
    header.addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        sortBy(header);
      }
    });
  }

  // report.html#0/relu3 opens with relu3 of report 0 (the first checkpoint in a sweep) pinned
  const key = decodeURIComponent(location.hash.slice(1));
  const linked = key && [...document.querySelectorAll("[data-layer]")].find((element) => `${element.dataset.report}/${element.dataset.layer}` === key);
  if (linked) {
    pin(linked);
    linked.scrollIntoView({ block: "nearest" });
  }
})();
