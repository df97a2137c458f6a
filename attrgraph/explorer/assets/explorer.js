/* The attribution-graph explorer. Reads the JSON in #vpd-data; vis-network draws and hit-tests the
   nodes, and this script draws everything else on the same canvas (row bands, edges, labels, axes),
   because one canvas pass over thousands of edges is far cheaper than as many vis edge objects.
   Every string from the graph reaches the page through textContent or canvas text, never as HTML. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("vpd-data").textContent);
  var N = D.nodes, E = D.edges, RH = D.row_height, COLS = D.columns, MINCOL = 96;
  function colMid(c) { return COLS[c][0] + COLS[c][1] / 2; }
  var COLORS = {q: "#4f46e5", k: "#0891b2", v: "#9333ea", qkv: "#7c3aed", o: "#15803d", gate: "#a16207",
    up: "#ea580c", down: "#be185d"};
  var SHAPES = {q: "triangle", k: "triangleDown", v: "square", qkv: "square", o: "dot", gate: "diamond",
    up: "hexagon", down: "star"};
  var KIND = {emb: ["#6b7280", "square"], logit: ["#111827", "diamond"], delta: ["#9ca3af", "triangle"]};
  var POS = [37, 99, 235], NEG = [234, 88, 12];
  var SN_COLORS = ["#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#84cc16"];

  function colorOf(n) { return n.kind === "comp" ? (COLORS[n.sub] || "#374151") : (KIND[n.kind] || ["#374151"])[0]; }
  function shapeOf(n) { return n.kind === "comp" ? (SHAPES[n.sub] || "dot") : (KIND[n.kind] || [0, "dot"])[1]; }
  // Whitespace made visible, so ' her' and 'her' differ on screen.
  function showTok(s) {
    return String(s).replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");
  }
  function fmt(x) {
    if (x === null || x === undefined) { return ""; }
    if (typeof x !== "number") { return String(x); }
    if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) { return x.toExponential(2); }
    return String(Math.round(x * 1e4) / 1e4);
  }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = text; }
    if (cls) { e.className = cls; }
    return e;
  }
  var rowName = D.rows;
  var nRows = rowName.length;
  // The matrix a node belongs to, whichever grid is shown (block rows name only the block).
  function matrixName(n) {
    var M = D.layouts && D.layouts.matrix;
    return M ? M.rows[M.at[indexOf[n.id]][2]] : rowName[n.row];
  }
  function nodeName(n) {
    var a = n.attrs;
    if (n.kind === "logit") { return "logit @" + a.pos; }
    if (n.kind === "emb") { return "Emb " + showTok(a.token || "") + " @" + a.pos; }
    return (n.key || n.id) + " @" + a.pos;
  }
  // The canvas label: the node's own label without a leading component key, else its key.
  function shortLabel(n) {
    var a = n.attrs, s = String(a.label || "");
    if (n.kind === "logit") {
      if (a.logit_token === undefined || a.logit_token === null) { return s || "logit " + a.token_id; }
      return showTok(a.logit_token) + (typeof a.prob === "number" ? "  p=" + fmt(a.prob) : "");
    }
    if (n.kind === "emb") { return ""; }
    var rest = s.replace(/^\S+:\d+(:\d+)?(@\d+)?\s*/, "");
    if (n.kind === "delta") { return "\u0394 " + matrixName(n); }
    rest = rest || n.key || s;
    return rest.length > 48 ? rest.slice(0, 47) + "\u2026" : rest;
  }

  // ---- adjacency and pruning ----------------------------------------------------------------
  var inE = N.map(function () { return []; }), outE = N.map(function () { return []; });
  var maxW = 0;
  E.forEach(function (e, i) {
    outE[e[0]].push(i); inE[e[1]].push(i);
    maxW = Math.max(maxW, Math.abs(e[2]));
  });
  maxW = maxW || 1;
  var byInfluence = N.map(function (n, i) { return i; }).filter(function (i) {
    return N[i].kind !== "emb" && N[i].kind !== "logit";
  }).sort(function (a, b) { return N[b].inf - N[a].inf; });
  var infTotal = byInfluence.reduce(function (s, i) { return s + Math.max(N[i].inf, 0); }, 0) || 1;
  var edgesByWeight = E.map(function (e, i) { return i; }).sort(function (a, b) {
    return Math.abs(E[b][2]) - Math.abs(E[a][2]);
  });
  var wTotal = E.reduce(function (s, e) { return s + Math.abs(e[2]); }, 0) || 1;

  var BUCKETS = [[0.08, 0.6], [0.25, 1.0], [0.5, 1.8], [0.8, 3.0]];
  function bucketOf(w) { var f = Math.abs(w) / maxW; return f < 0.1 ? 0 : f < 0.3 ? 1 : f < 0.6 ? 2 : 3; }
  var state = {sel: null, pins: [], groups: [], nt: 1, et: D.edge_threshold, layout: D.layout || "matrix"};
  var nodeOn = new Uint8Array(N.length), edgeOn = new Uint8Array(E.length);
  var visEdges = [], byBucket = [];

  // circuit-tracer's rule: keep the most influential nodes until their share of the total reaches
  // the threshold; embeddings and logits always stay. Edges likewise by share of total |weight|.
  function prune() {
    nodeOn.fill(0);
    N.forEach(function (n, i) { if (n.kind === "emb" || n.kind === "logit") { nodeOn[i] = 1; } });
    var cum = 0;
    for (var j = 0; j < byInfluence.length; j++) {
      if (cum / infTotal >= state.nt && state.nt < 1) { break; }
      nodeOn[byInfluence[j]] = 1;
      cum += Math.max(N[byInfluence[j]].inf, 0);
    }
    edgeOn.fill(0);
    visEdges = [];
    var wcum = 0;
    for (var k = 0; k < edgesByWeight.length; k++) {
      var i = edgesByWeight[k], e = E[i];
      if (!nodeOn[e[0]] || !nodeOn[e[1]]) { continue; }
      if (wcum / wTotal >= state.et && state.et < 1) { break; }
      edgeOn[i] = 1; visEdges.push(i);
      wcum += Math.abs(e[2]);
    }
    // Edges grouped by (sign, strength) once per pruning, so each frame strokes 8 paths in one pass.
    byBucket = [[], [], [], [], [], [], [], []];
    visEdges.forEach(function (i) { byBucket[(E[i][2] < 0 ? 4 : 0) + bucketOf(E[i][2])].push(i); });
  }

  // ---- the network ----------------------------------------------------------------------------
  prune();
  var nodes = new vis.DataSet(N.map(function (n, i) {
    var c = colorOf(n);
    return {id: n.id, x: n.x, y: n.y, shape: shapeOf(n), size: n.kind === "logit" ? 9 : 7, hidden: !nodeOn[i],
      color: {background: c, border: c, highlight: {background: "#facc15", border: "#111827"},
        hover: {background: c, border: "#111827"}}, borderWidth: 1, label: undefined};
  }));
  var indexOf = {};
  N.forEach(function (n, i) { indexOf[n.id] = i; });
  var container = document.getElementById("vpd-graph");
  var options = {
    physics: {enabled: false},
    layout: {improvedLayout: false, randomSeed: 0},
    nodes: {font: {size: 0}, shadow: false, fixed: true},
    interaction: {hover: true, hoverConnectedEdges: false, selectConnectedEdges: false, multiselect: false,
      tooltipDelay: 3600000, zoomSpeed: 0.6, dragNodes: false}
  };
  var network = new vis.Network(container, {nodes: nodes, edges: new vis.DataSet([])}, options);
  window.network = network;

  var width = D.width;
  var height = nRows * RH;
  function rowY(r) { return (nRows - 1 - r) * RH; }
  // Switch the grid: one row per matrix, or one row per block (a deep model's first view).
  var rowsButton = document.getElementById("vpd-rows");
  function useLayout(name) {
    var L = D.layouts && D.layouts[name];
    if (!L) { return; }
    state.layout = name;
    RH = L.row_height || RH;
    COLS = L.columns; rowName = L.rows; nRows = rowName.length; width = L.width; height = nRows * RH;
    var upd = N.map(function (n, i) {
      var p = L.at[i]; n.x = p[0]; n.y = p[1]; n.row = p[2];
      return {id: n.id, x: n.x, y: n.y};
    });
    nodes.update(upd);
    if (rowsButton) {
      rowsButton.textContent = name === "block" ? "rows: per block" : "rows: per matrix";
      rowsButton.title = name === "block" ? "One row per block, its matrices side by side in each cell; click for one row per matrix" :
        "One row per matrix; click for one row per block";
    }
  }

  // ---- drawing ------------------------------------------------------------------------------
  network.on("beforeDrawing", function (ctx) {
    var s = network.getScale();
    // Row bands: one shade per block, alternating, so a block's matrices read as one group.
    var block = -1, shade = 0;
    for (var r = 0; r < nRows; r++) {
      var m = /^L(\d+)/.exec(rowName[r]);
      var b = m ? +m[1] : -2 - r;
      if (b !== block) { shade = 1 - shade; block = b; }
      ctx.fillStyle = shade ? "rgba(243,244,246,0.9)" : "rgba(255,255,255,0.9)";
      ctx.fillRect(-MINCOL / 4, rowY(r) - RH / 2, width + MINCOL / 2, RH);
    }
    ctx.strokeStyle = "rgba(209,213,219,0.7)";
    ctx.lineWidth = 1 / s;
    ctx.beginPath();
    for (var c = 0; c < D.n_cols; c++) { ctx.moveTo(COLS[c][0], -RH / 2); ctx.lineTo(COLS[c][0], height - RH / 2); }
    ctx.moveTo(width, -RH / 2); ctx.lineTo(width, height - RH / 2);
    ctx.stroke();
    drawEdges(ctx, s);
  });

  function drawEdges(ctx, s) {
    var sel = state.sel === null ? -1 : indexOf[state.sel];
    var dim = sel >= 0;
    for (var b = 0; b < 8; b++) {
      var list = byBucket[b];
      if (!list.length) { continue; }
      ctx.beginPath();
      for (var k = 0; k < list.length; k++) {
        var e = E[list[k]];
        if (dim && (e[0] === sel || e[1] === sel)) { continue; }
        var u = N[e[0]], v = N[e[1]];
        ctx.moveTo(u.x, u.y); ctx.lineTo(v.x, v.y);
      }
      ctx.strokeStyle = "rgba(" + (b >= 4 ? NEG : POS).join(",") + "," + (dim ? 0.05 : BUCKETS[b % 4][0]) + ")";
      ctx.lineWidth = BUCKETS[b % 4][1] / s;
      ctx.stroke();
    }
    if (dim) {
      inE[sel].concat(outE[sel]).forEach(function (i) {
        if (!edgeOn[i]) { return; }
        var e = E[i], u = N[e[0]], v = N[e[1]];
        ctx.beginPath(); ctx.moveTo(u.x, u.y); ctx.lineTo(v.x, v.y);
        ctx.strokeStyle = "rgba(" + (e[2] < 0 ? NEG : POS).join(",") + ",0.9)";
        ctx.lineWidth = (1 + 3 * Math.abs(e[2]) / maxW) / s;
        ctx.stroke();
      });
      drawQK(ctx, s, sel);
    }
  }
  // Query/key pairs of a selected o node: their own edge type, dashed, width by strength.
  function drawQK(ctx, s, sel) {
    var pairs = D.qk.filter(function (p) { return p.o === sel; });
    var top = pairs.reduce(function (m, p) { return Math.max(m, Math.abs(p.strength)); }, 0) || 1;
    ctx.save();
    ctx.setLineDash([6 / s, 4 / s]);
    pairs.forEach(function (p) {
      [[p.q, "rgba(79,70,229,0.9)"], [p.k, "rgba(8,145,178,0.9)"]].forEach(function (end) {
        if (end[0] === null || end[0] === undefined) { return; }
        var a = N[end[0]], o = N[sel];
        ctx.beginPath(); ctx.moveTo(a.x, a.y); ctx.lineTo(o.x, o.y);
        ctx.strokeStyle = end[1]; ctx.lineWidth = (1 + 3 * Math.abs(p.strength) / top) / s; ctx.stroke();
      });
    });
    ctx.restore();
  }

  function snColor(i) { return SN_COLORS[i % SN_COLORS.length]; }
  network.on("afterDrawing", function (ctx) {
    var s = network.getScale();
    state.pins.forEach(function (id) {
      var n = N[indexOf[id]];
      ctx.beginPath(); ctx.arc(n.x, n.y, 10 / Math.max(s, 0.5), 0, 2 * Math.PI);
      ctx.strokeStyle = "#111827"; ctx.lineWidth = 1.5 / s; ctx.stroke();
    });
    state.groups.forEach(function (g, gi) {
      g[1].forEach(function (id) {
        var n = N[indexOf[id]];
        ctx.beginPath(); ctx.arc(n.x, n.y, 13 / Math.max(s, 0.5), 0, 2 * Math.PI);
        ctx.strokeStyle = snColor(gi); ctx.lineWidth = 3 / s; ctx.stroke();
      });
    });
    var canvas = ctx.canvas, pr = canvas.width / canvas.clientWidth;
    ctx.save();
    ctx.setTransform(pr, 0, 0, pr, 0, 0);
    drawLabels(ctx, s, canvas.clientWidth, canvas.clientHeight);
    drawAxes(ctx, s, canvas.clientWidth, canvas.clientHeight);
    ctx.restore();
    if (!window.vpdReady) {
      window.vpdReady = performance.now();
      document.body.setAttribute("data-ready", "1");
    }
  });

  var labelRank = N.map(function (n, i) { return i; }).filter(function (i) { return N[i].kind !== "emb"; })
    .sort(function (a, b) {
      var la = N[a].kind === "logit", lb = N[b].kind === "logit";
      if (la !== lb) { return la ? -1 : 1; }
      return la ? (N[b].attrs.prob || 0) - (N[a].attrs.prob || 0) : N[b].inf - N[a].inf;
    });
  // Labels of the most influential visible nodes, greedily placed without overlap in screen space.
  function drawLabels(ctx, s, W, H) {
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    var placed = [], budget = 40;
    var first = [];
    if (state.sel !== null) { first.push(indexOf[state.sel]); }
    state.pins.forEach(function (id) { first.push(indexOf[id]); });
    var order = first.concat(labelRank);
    var seen = {};
    for (var k = 0; k < order.length && budget > 0; k++) {
      var i = order[k];
      if (seen[i] || !nodeOn[i]) { continue; }
      seen[i] = 1;
      var n = N[i], text = shortLabel(n);
      if (!text) { continue; }
      var p = network.canvasToDOM({x: n.x, y: n.y});
      if (p.x < 90 || p.x > W || p.y < 0 || p.y > H - 36) { continue; }
      var w = ctx.measureText(text).width + 4;
      // Above or below the node, never beside it, where the cell's neighbours sit.
      var spots = n.kind === "logit" ? [[p.x - w / 2, p.y - 22]] : [[p.x - 6, p.y - 20], [p.x - 6, p.y + 7], [p.x - w + 6, p.y - 20]];
      var box = null;
      for (var q = 0; q < spots.length && !box; q++) {
        var cand = [spots[q][0], spots[q][1], w, 13];
        var clash = placed.some(function (b) {
          return cand[0] < b[0] + b[2] && b[0] < cand[0] + cand[2] && cand[1] < b[1] + b[3] && b[1] < cand[1] + cand[3];
        });
        if (!clash) { box = cand; }
      }
      if (!box) { continue; }
      placed.push(box);
      budget--;
      ctx.lineWidth = 3; ctx.strokeStyle = "rgba(255,255,255,0.9)"; ctx.lineJoin = "round";
      ctx.strokeText(text, box[0] + 2, box[1] + 6.5);
      ctx.fillStyle = n.kind === "logit" ? "#111827" : "#1f2937";
      ctx.fillText(text, box[0] + 2, box[1] + 6.5);
    }
    state.groups.forEach(function (g, gi) {
      var m = g[1].map(function (id) { return N[indexOf[id]]; });
      if (!m.length) { return; }
      var p = network.canvasToDOM({x: m[0].x, y: m[0].y});
      ctx.font = "bold 12px system-ui, sans-serif";
      ctx.fillStyle = snColor(gi);
      ctx.fillText(g[0], p.x - 10, p.y - 20);
      ctx.font = "11px system-ui, sans-serif";
    });
  }
  // Row names stay on the left edge and the prompt tokens along the bottom, whatever the pan and zoom.
  function drawAxes(ctx, s, W, H) {
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    for (var r = 0; r < nRows; r++) {
      var y = network.canvasToDOM({x: 0, y: rowY(r)}).y;
      if (y < -10 || y > H - 30) { continue; }
      var w = ctx.measureText(rowName[r]).width + 8;
      ctx.fillStyle = "rgba(255,255,255,0.92)";
      ctx.fillRect(0, y - 8, w, 16);
      ctx.fillStyle = "#374151";
      ctx.fillText(rowName[r], 4, y);
    }
    ctx.fillStyle = "rgba(249,250,251,0.96)";
    ctx.fillRect(0, H - 34, W, 34);
    ctx.strokeStyle = "#d1d5db"; ctx.lineWidth = 1;
    ctx.beginPath(); ctx.moveTo(0, H - 34); ctx.lineTo(W, H - 34); ctx.stroke();
    ctx.textAlign = "center";
    var lastRight = -Infinity;
    for (var c = 0; c < D.n_cols; c++) {
      var colPx = COLS[c][1] * s;
      var x = network.canvasToDOM({x: colMid(c), y: 0}).x;
      if (x < -colPx || x > W + colPx || x - 12 < lastRight) { continue; }
      ctx.font = "12px ui-monospace, monospace";
      var t = showTok(c < D.tokens.length ? D.tokens[c] : "");
      var room = Math.max(colPx - 6, 24);
      while (t.length > 1 && ctx.measureText(t).width > room) { t = t.slice(0, -2) + "\u2026"; }
      lastRight = x + Math.max(ctx.measureText(t).width, 20) / 2;
      ctx.fillStyle = "#6b7280"; ctx.font = "10px system-ui, sans-serif";
      ctx.fillText(String(c), x, H - 25);
      ctx.fillStyle = "#111827"; ctx.font = "12px ui-monospace, monospace";
      ctx.fillText(t, x, H - 11);
    }
    ctx.textAlign = "start";
  }

  // ---- view: fit the rows to the height, start at the target's end, horizontal scroll ---------
  var hscroll = document.getElementById("vpd-hscroll"), hinner = hscroll.firstElementChild;
  var moved = false;
  function syncScroll() {
    var s = network.getScale(), vp = network.getViewPosition();
    hinner.style.width = Math.max((width + 200) * s, container.clientWidth) + "px";
    hscroll.style.visibility = (width + 200) * s > container.clientWidth ? "visible" : "hidden";
    var left = (vp.x + 100) * s - container.clientWidth / 2;
    hscroll.dataset.sync = "1";
    hscroll.scrollLeft = left;
  }
  hscroll.addEventListener("scroll", function () {
    if (hscroll.dataset.sync) { delete hscroll.dataset.sync; return; }
    var s = network.getScale(), vp = network.getViewPosition();
    moved = true;
    var x = (hscroll.scrollLeft + container.clientWidth / 2) / s - 100;
    network.moveTo({position: {x: x, y: vp.y}, scale: s, animation: false});
  });
  // Until the reader moves the view, a resize (the page settling, a new window size) re-fits it.
  ["zoom", "dragEnd"].forEach(function (ev) { network.on(ev, function () { moved = true; syncScroll(); }); });
  network.on("resize", function () { if (moved) { syncScroll(); } else { setTimeout(home, 0); } });
  // A sideways or shift+wheel pans; a plain wheel zooms (vis-network's own handler).
  container.addEventListener("wheel", function (ev) {
    if (!(ev.shiftKey || Math.abs(ev.deltaX) > Math.abs(ev.deltaY))) { return; }
    ev.preventDefault(); ev.stopPropagation();
    moved = true;
    var s = network.getScale(), vp = network.getViewPosition();
    var d = Math.abs(ev.deltaX) > Math.abs(ev.deltaY) ? ev.deltaX : ev.deltaY;
    network.moveTo({position: {x: vp.x + d / s, y: vp.y}, scale: s, animation: false});
    syncScroll();
  }, {capture: true, passive: false});
  function home() {
    var W = container.clientWidth, Hc = container.clientHeight, H = Hc - 34;
    // Fill the height (never below a readable row; wide prompts scroll instead of shrinking), and show
    // the whole width too when that costs at most a quarter of the scale.
    var fitH = (H - 16) / (height + 4), fitW = (W - 110) / (width + 4);
    var fit = fitW >= 0.75 * fitH ? Math.min(fitH, fitW) : fitH;
    var s = Math.min(1.6, Math.max(fit, 0.34, 40 / MINCOL));
    var cx = width * s <= W - 100 ? width / 2 - 50 / s : width - (W / 2 - 16) / s;
    var cy = height * s <= H ? (height - RH) / 2 + 17 / s : height - RH / 2 + 34 / s - Hc / 2 / s + 6 / s;
    network.moveTo({position: {x: cx, y: cy}, scale: s, animation: false});
    syncScroll();
  }

  // ---- panes --------------------------------------------------------------------------------
  var selPane = document.getElementById("vpd-selected");
  function edgeRow(i, other) {
    var e = E[i], n = N[other];
    var li = el("li");
    li.appendChild(el("span", (e[2] >= 0 ? "+" : "") + fmt(e[2]), "w " + (e[2] >= 0 ? "pos" : "neg")));
    var bar = el("span", null, "bar");
    bar.style.width = Math.max(2, 50 * Math.abs(e[2]) / maxW) + "px";
    bar.style.background = e[2] >= 0 ? "rgb(" + POS + ")" : "rgb(" + NEG + ")";
    li.appendChild(bar);
    li.appendChild(el("span", nodeName(n) + "  " + shortLabel(n), "name"));
    li.title = n.id;
    li.addEventListener("click", function () { select(n.id, true); });
    return li;
  }
  function edgeList(title, list, otherEnd) {
    var frag = document.createDocumentFragment();
    frag.appendChild(el("h3", title + " (" + list.length + ")"));
    var ul = el("ul");
    // Positive edges strongest first, then negative edges strongest first.
    list.slice().sort(function (a, b) {
      var wa = E[a][2], wb = E[b][2];
      if ((wa < 0) !== (wb < 0)) { return wa < 0 ? 1 : -1; }
      return Math.abs(wb) - Math.abs(wa);
    }).forEach(function (i) {
      ul.appendChild(edgeRow(i, E[i][otherEnd]));
    });
    frag.appendChild(ul);
    return frag;
  }
  function renderSelected() {
    selPane.textContent = "";
    if (state.sel === null) {
      selPane.appendChild(el("div", "Click a node to list its inputs and outputs; ctrl/cmd-click pins it.", "muted"));
      return;
    }
    var i = indexOf[state.sel], n = N[i];
    selPane.appendChild(el("h3", nodeName(n)));
    selPane.appendChild(dashboard(n));
    selPane.appendChild(edgeList("Inputs", inE[i].filter(function (k) { return nodeOn[E[k][0]]; }), 0));
    selPane.appendChild(edgeList("Outputs", outE[i].filter(function (k) { return nodeOn[E[k][1]]; }), 1));
    var pairs = D.qk.filter(function (p) { return p.o === i; });
    if (pairs.length) {
      selPane.appendChild(el("h3", "q/k pairs (" + pairs.length + ", dashed)"));
      var ul = el("ul");
      pairs.forEach(function (p) {
        var q = p.q !== null && p.q !== undefined ? nodeName(N[p.q]) : p.q_label + " (not in graph)";
        var k = p.k !== null && p.k !== undefined ? nodeName(N[p.k]) : p.k_label + " (not in graph)";
        ul.appendChild(el("li", fmt(p.strength) + "  " + q + " \u00d7 " + k));
      });
      selPane.appendChild(ul);
    }
  }
  // ---- subcomponent cards: a short one on hover, the dashboard of the selected node -----------
  var SOURCE_NAME = {stats: "offline label from statistics", llm: "LLM label (vpd autointerp)", user: "user label"};
  var CTOK = D.card_tokens || [];
  function sourceBadge(src) {
    var b = el("span", src === "llm" ? "LLM" : src === "user" ? "user" : "stats", "src src-" + (src || "stats"));
    b.title = SOURCE_NAME[src] || SOURCE_NAME.stats;
    return b;
  }
  function labelLine(n, card) {
    var a = n.attrs, line = el("div", null, "lbl");
    var own = String(a.label || "").replace(/^\S+:\d+(:\d+)?(@\d+)?\s*/, "");
    var src = a.label_source || (card && card.label ? "stats" : null);
    if (!own && card && card.label) { own = card.label; }
    if (!own) { return null; }
    if (src) { line.appendChild(sourceBadge(src)); }
    line.appendChild(el("span", " " + own));
    return line;
  }
  // One context: tokens shaded by their CI, the firing token marked; `around` limits the tokens either side.
  function contextLine(ctx, around) {
    var d = el("div", null, "ex");
    ctx.t.forEach(function (ti, j) {
      if (around !== undefined && Math.abs(j - ctx.c) > around) { return; }
      var tok = el(j === ctx.c ? "mark" : "span", showTok(CTOK[ti] !== undefined ? CTOK[ti] : "?"));
      var ci = ctx.ci[j] || 0;
      if (ci > 0 && j !== ctx.c) { tok.style.background = "rgba(245,158,11," + (0.12 + 0.6 * ci / 100).toFixed(2) + ")"; }
      tok.title = "CI " + (ci / 100).toFixed(2);
      d.appendChild(tok);
    });
    return d;
  }
  function tokenTable(title, rows, heads) {
    if (!rows || !rows.length) { return null; }
    var box = el("div", null, "dash-col");
    box.appendChild(el("div", title, "dash-h"));
    var t = el("table", null, "dash-t"), tr = el("tr");
    ["token"].concat(heads).forEach(function (h) { tr.appendChild(el("th", h)); });
    t.appendChild(tr);
    rows.forEach(function (r) {
      var row = el("tr");
      var td = el("td"); td.appendChild(el("span", showTok(r[0]), "tok")); row.appendChild(td);
      heads.forEach(function (h, j) {
        var v = r[j + 1];
        row.appendChild(el("td", v === null || v === undefined ? "" : h.indexOf("%") >= 0 ? (100 * v).toFixed(1) : fmt(v)));
      });
      t.appendChild(row);
    });
    box.appendChild(t);
    return box;
  }
  function facts(n) {
    var a = n.attrs, t = el("table", null, "facts");
    function row(k, v) {
      if (v === undefined || v === null || v === "") { return; }
      var tr = el("tr"); tr.appendChild(el("td", k)); tr.appendChild(el("td", v)); t.appendChild(tr);
    }
    row("key", n.key || n.id);
    row("matrix", matrixName(n));
    row("position", a.pos + "  " + showTok(a.token !== undefined ? a.token : (D.tokens[a.pos] || "")));
    if (n.kind === "logit") { row("probability", fmt(a.prob)); }
    row("CI here", fmt(a.ci));
    row("activation", fmt(a.activation));
    row("influence", fmt(n.inf));
    var card = n.key ? D.cards[n.key] : null;
    if (card) {
      row("density", fmt(card.density) + (card.n_tokens ? "  (" + (card.firing_count || 0) + " firings in " +
        card.n_tokens + " tokens)" : ""));
    }
    if (n.kind !== "comp") { row("label", a.label); }
    return t;
  }
  function hoverCard(n) {
    var box = el("div"), card = n.key ? D.cards[n.key] : null;
    var line = n.kind === "comp" ? labelLine(n, card) : null;
    if (line) { box.appendChild(line); }
    box.appendChild(facts(n));
    if (card && card.contexts.length) {
      box.appendChild(el("div", "Top activating examples", "muted"));
      card.contexts.slice(0, 3).forEach(function (ctx) { box.appendChild(contextLine(ctx, 8)); });
    } else if (n.kind === "comp") {
      box.appendChild(el("div", "No examples: run `vpd harvest` for this run.", "muted"));
    }
    return box;
  }
  // Partners of a q or k node among the graph's q/k pairs, strongest first, one line per partner node.
  function qkPartners(i) {
    var n = N[i], mine = n.sub === "q" ? "q" : n.sub === "k" ? "k" : null;
    if (!mine) { return []; }
    var other = mine === "q" ? "k" : "q", best = {};
    D.qk.forEach(function (p) {
      if (p[mine] !== i) { return; }
      var id = p[other] !== null && p[other] !== undefined ? N[p[other]].id : p[other + "_label"];
      if (!best[id] || Math.abs(p.strength) > Math.abs(best[id].strength)) {
        best[id] = {id: id, strength: p.strength, inGraph: p[other] !== null && p[other] !== undefined};
      }
    });
    return Object.keys(best).map(function (k) { return best[k]; })
      .sort(function (a, b) { return Math.abs(b.strength) - Math.abs(a.strength); });
  }
  function dashboard(n) {
    var i = indexOf[n.id], box = el("div", null, "dash"), card = n.key ? D.cards[n.key] : null;
    var line = n.kind === "comp" ? labelLine(n, card) : null;
    if (line) { box.appendChild(line); }
    if (card && card.label && n.attrs.label_source && n.attrs.label_source !== "stats") {
      var alt = el("div", null, "lbl muted");
      alt.appendChild(sourceBadge("stats")); alt.appendChild(el("span", " " + card.label));
      box.appendChild(alt);
    }
    box.appendChild(facts(n));
    if (card) {
      if (card.contexts.length) {
        box.appendChild(el("h3", "Top activating contexts (" + card.contexts.length + ", CI shaded)"));
        card.contexts.forEach(function (ctx) { box.appendChild(contextLine(ctx)); });
      }
      var cols = el("div", null, "dash-cols");
      [tokenTable("Fires on", card.inputs, ["prec %", "recall %"]),
        tokenTable("Next tokens, more likely", card.outputs, ["PMI"]),
        tokenTable("Next tokens, less likely", card.outputs_bottom.slice(0, 5), ["PMI"]),
        tokenTable("Write direction promotes", card.promotes.slice(0, 5), ["logit"]),
        tokenTable("Write direction suppresses", card.suppresses.slice(0, 5), ["logit"])
      ].forEach(function (t) { if (t) { cols.appendChild(t); } });
      box.appendChild(cols);
      if (card.words.length) {
        var w = el("div", null, "words");
        w.appendChild(el("span", "Inside words: ", "muted"));
        card.words.forEach(function (x) { w.appendChild(el("span", x[0] + " " + Math.round(100 * x[1]) + "%", "tok")); });
        box.appendChild(w);
      }
      if (card.cofiring.length) {
        box.appendChild(el("h3", "Co-fires with (Jaccard)"));
        var ul = el("ul");
        card.cofiring.forEach(function (c) {
          var li = el("li");
          li.appendChild(el("span", fmt(c[1]), "w"));
          li.appendChild(el("span", c[0] + (c[2] ? "  " + c[2] : ""), "name"));
          var there = N.filter(function (m) { return m.key === c[0]; })[0];
          if (there) { li.addEventListener("click", function () { select(there.id, true); }); } else { li.className = "off"; }
          li.title = there ? "in this graph: click to select" : "not in this graph";
          ul.appendChild(li);
        });
        box.appendChild(ul);
      }
    } else if (n.kind === "comp") {
      box.appendChild(el("div", "No examples for this subcomponent: run `vpd harvest` for this run.", "muted"));
    }
    var partners = qkPartners(i);
    if (partners.length) {
      box.appendChild(el("h3", (n.sub === "q" ? "Keys" : "Queries") + " it pairs with (q/k strength)"));
      var pl = el("ul");
      partners.forEach(function (p) {
        var li = el("li");
        li.appendChild(el("span", fmt(p.strength), "w"));
        li.appendChild(el("span", p.inGraph ? nodeName(N[indexOf[p.id]]) + "  " + shortLabel(N[indexOf[p.id]]) : p.id + " (not in graph)", "name"));
        if (p.inGraph) { li.addEventListener("click", function () { select(p.id, true); }); }
        pl.appendChild(li);
      });
      box.appendChild(pl);
    }
    return box;
  }

  var cardEl = document.getElementById("vpd-card");
  network.on("hoverNode", function (p) {
    var n = N[indexOf[p.node]];
    cardEl.textContent = "";
    cardEl.appendChild(el("b", nodeName(n)));
    cardEl.appendChild(hoverCard(n));
    cardEl.style.display = "block";
    var r = container.getBoundingClientRect();
    var x = r.left + p.pointer.DOM.x + 16, y = r.top + p.pointer.DOM.y + 12;
    cardEl.style.left = Math.min(x, window.innerWidth - cardEl.offsetWidth - 8) + "px";
    cardEl.style.top = Math.min(y, window.innerHeight - cardEl.offsetHeight - 8) + "px";
  });
  network.on("blurNode", function () { cardEl.style.display = "none"; });
  network.on("dragStart", function () { cardEl.style.display = "none"; });

  var pinPane = document.getElementById("vpd-pinned");
  function renderPinned() {
    pinPane.textContent = "";
    if (!state.pins.length) {
      pinPane.appendChild(el("div", "No pinned nodes.", "muted"));
    }
    var ul = el("ul");
    state.pins.forEach(function (id) {
      var n = N[indexOf[id]], li = el("li");
      var box = el("input"); box.type = "checkbox"; box.value = id; box.className = "vpd-pin-check";
      li.appendChild(box);
      li.appendChild(el("span", nodeName(n) + "  " + shortLabel(n), "name"));
      var x = el("button", "\u00d7"); x.title = "unpin";
      x.addEventListener("click", function (ev) { ev.stopPropagation(); togglePin(id); });
      li.appendChild(x);
      ul.appendChild(li);
    });
    pinPane.appendChild(ul);
    var gl = el("ul");
    state.groups.forEach(function (g, gi) {
      var li = el("li");
      var sw = el("span", null, "sw"); sw.style.background = snColor(gi);
      li.appendChild(sw);
      li.appendChild(el("span", g[0] + " (" + g[1].length + ")", "name"));
      var x = el("button", "ungroup");
      x.addEventListener("click", function () { state.groups.splice(gi, 1); changed(); });
      li.appendChild(x);
      gl.appendChild(li);
    });
    pinPane.appendChild(gl);
    drawSubgraph();
  }
  // The pinned subgraph: pinned nodes on their own compact grid, each supernode as one node.
  function drawSubgraph() {
    var cv = document.getElementById("vpd-sub"), ctx = cv.getContext("2d");
    cv.style.display = state.pins.length ? "block" : "none";
    var pr = window.devicePixelRatio || 1;
    cv.width = cv.clientWidth * pr; cv.height = cv.clientHeight * pr;
    ctx.setTransform(pr, 0, 0, pr, 0, 0);
    ctx.clearRect(0, 0, cv.clientWidth, cv.clientHeight);
    var owner = {}, items = [];
    state.groups.forEach(function (g, gi) {
      var m = g[1].map(function (id) { return indexOf[id]; });
      items.push({name: g[0], members: m, color: snColor(gi)});
      m.forEach(function (i) { owner[i] = items.length - 1; });
    });
    state.pins.forEach(function (id) {
      var i = indexOf[id];
      if (owner[i] === undefined) { items.push({name: shortLabel(N[i]) || nodeName(N[i]), members: [i], color: colorOf(N[i])}); owner[i] = items.length - 1; }
    });
    if (!items.length) { return; }
    var cols = {}, rows = {};
    items.forEach(function (it) {
      it.col = Math.max.apply(null, it.members.map(function (i) { return N[i].attrs.pos; }));
      it.row = Math.max.apply(null, it.members.map(function (i) { return N[i].row; }));
      cols[it.col] = 1; rows[it.row] = 1;
    });
    var cl = Object.keys(cols).map(Number).sort(function (a, b) { return a - b; });
    var rl = Object.keys(rows).map(Number).sort(function (a, b) { return a - b; });
    var W = cv.clientWidth, H = cv.clientHeight, slot = {};
    items.forEach(function (it) {
      var k = it.col + ":" + it.row; slot[k] = (slot[k] || 0) + 1; it.k = slot[k] - 1;
      it.x = 20 + (cl.indexOf(it.col) + 0.5) * (W - 40) / cl.length + it.k * 12;
      it.y = H - 16 - (rl.indexOf(it.row) + 0.5) * (H - 32) / rl.length;
    });
    var sum = {};
    E.forEach(function (e) {
      var a = owner[e[0]], b = owner[e[1]];
      if (a === undefined || b === undefined || a === b) { return; }
      sum[a + ">" + b] = (sum[a + ">" + b] || 0) + e[2];
    });
    Object.keys(sum).forEach(function (key) {
      var ab = key.split(">"), u = items[+ab[0]], v = items[+ab[1]], w = sum[key];
      ctx.beginPath(); ctx.moveTo(u.x, u.y); ctx.lineTo(v.x, v.y);
      ctx.strokeStyle = "rgba(" + (w < 0 ? NEG : POS).join(",") + ",0.7)";
      ctx.lineWidth = 0.5 + 3 * Math.min(1, Math.abs(w) / maxW); ctx.stroke();
    });
    ctx.font = "10px system-ui, sans-serif";
    items.forEach(function (it) {
      ctx.beginPath(); ctx.arc(it.x, it.y, it.members.length > 1 ? 7 : 5, 0, 2 * Math.PI);
      ctx.fillStyle = it.color; ctx.fill();
      ctx.fillStyle = "#111827";
      ctx.fillText(it.name.slice(0, 22), it.x + 8, it.y - 6 + 12 * it.k);  // cell-mates' labels stack downwards
    });
  }

  // ---- state --------------------------------------------------------------------------------
  function writeHash() {
    var st = {s: state.sel, p: state.pins, g: state.groups, n: state.nt, e: state.et, l: state.layout};
    history.replaceState(null, "", "#" + encodeURIComponent(JSON.stringify(st)));
  }
  function readHash() {
    if (location.hash.length < 2) { return; }
    try {
      var st = JSON.parse(decodeURIComponent(location.hash.slice(1)));
      var ok = function (id) { return typeof id === "string" && indexOf[id] !== undefined; };
      state.sel = ok(st.s) ? st.s : null;
      state.pins = (st.p || []).filter(ok);
      state.groups = (st.g || []).filter(function (g) { return Array.isArray(g) && Array.isArray(g[1]); })
        .map(function (g) { return [String(g[0]), g[1].filter(ok)]; });
      if (typeof st.n === "number") { state.nt = Math.min(Math.max(st.n, 0), 1); }
      if (typeof st.e === "number") { state.et = Math.min(Math.max(st.e, 0), 1); }
      if (st.l === "block" || st.l === "matrix") { state.layout = st.l; }
    } catch (err) { /* a hand-edited or truncated hash: open the default view */ }
  }
  var nodeSlider = document.getElementById("vpd-node-threshold");
  var edgeSlider = document.getElementById("vpd-edge-threshold");
  var counts = document.getElementById("vpd-counts");
  function applyPrune() {
    var before = nodeOn.slice();
    prune();
    var upd = [];
    for (var i = 0; i < N.length; i++) { if (before[i] !== nodeOn[i]) { upd.push({id: N[i].id, hidden: !nodeOn[i]}); } }
    if (upd.length) { nodes.update(upd); }
    var shown = 0;
    for (var j = 0; j < N.length; j++) { shown += nodeOn[j]; }
    counts.textContent = shown + " / " + N.length + " nodes, " + visEdges.length + " / " + E.length + " edges";
    counts.setAttribute("data-nodes", shown);
    counts.setAttribute("data-edges", visEdges.length);
    document.getElementById("vpd-nt-value").textContent = state.nt.toFixed(2);
    document.getElementById("vpd-et-value").textContent = state.et.toFixed(2);
  }
  // vis-network's own request: at most one drawing per animation frame, however many changes.
  function requestDraw() { network.body.emitter.emit("_requestRedraw"); }
  function changed() {
    renderSelected(); renderPinned(); writeHash(); requestDraw();
  }
  function select(id, focus) {
    state.sel = id;
    if (id === null) { network.unselectAll(); } else {
      network.selectNodes([id]);
      if (focus) {
        var n = N[indexOf[id]];
        network.moveTo({position: {x: n.x, y: network.getViewPosition().y}, scale: network.getScale(), animation: false});
        syncScroll();
      }
    }
    changed();
  }
  function togglePin(id) {
    var k = state.pins.indexOf(id);
    if (k >= 0) {
      state.pins.splice(k, 1);
      state.groups.forEach(function (g) { g[1] = g[1].filter(function (m) { return m !== id; }); });
      state.groups = state.groups.filter(function (g) { return g[1].length; });
    } else { state.pins.push(id); }
    changed();
  }
  function group(name) {
    var checked = Array.prototype.slice.call(document.querySelectorAll(".vpd-pin-check:checked"))
      .map(function (b) { return b.value; });
    var members = checked.length ? checked : state.pins.slice();
    if (!members.length) { return; }
    state.groups.forEach(function (g) { g[1] = g[1].filter(function (m) { return members.indexOf(m) < 0; }); });
    state.groups = state.groups.filter(function (g) { return g[1].length; });
    state.groups.push([name || "supernode " + (state.groups.length + 1), members]);
    changed();
  }
  network.on("click", function (p) {
    var ev = p.event && p.event.srcEvent;
    if (p.nodes.length && ev && (ev.ctrlKey || ev.metaKey)) {
      togglePin(p.nodes[0]);
      if (state.sel !== null) { network.selectNodes([state.sel]); } else { network.unselectAll(); }
      return;
    }
    select(p.nodes.length ? p.nodes[0] : null, false);
  });
  nodeSlider.addEventListener("input", function () { state.nt = +nodeSlider.value; applyPrune(); writeHash(); renderSelected(); requestDraw(); });
  edgeSlider.addEventListener("input", function () { state.et = +edgeSlider.value; applyPrune(); writeHash(); renderSelected(); requestDraw(); });
  document.getElementById("vpd-group").addEventListener("click", function () {
    group(document.getElementById("vpd-sn-name").value.trim());
  });
  document.getElementById("vpd-home").addEventListener("click", home);

  // ---- export -------------------------------------------------------------------------------
  // The pinned subgraph (every visible node when none is pinned) in attrgraph's node-link format,
  // with supernodes in the graph attributes and on their member nodes: `load_graph_json` reads it.
  function exportJSON() {
    var ids = state.pins.length ? state.pins.map(function (id) { return indexOf[id]; })
      : N.map(function (n, i) { return i; }).filter(function (i) { return nodeOn[i]; });
    var keep = {};
    ids.forEach(function (i) { keep[i] = 1; });
    var owner = {};
    state.groups.forEach(function (g) { g[1].forEach(function (id) { owner[id] = g[0]; }); });
    var graph = JSON.parse(JSON.stringify(D.graph));
    graph.supernodes = state.groups.map(function (g) { return {name: g[0], members: g[1].filter(function (id) { return keep[indexOf[id]]; })}; });
    graph.explorer = {node_threshold: state.nt, edge_threshold: state.et, selected: state.sel};
    var out = {format: "attribution_graph_node_link", format_version: 1, directed: true, multigraph: false, graph: graph,
      nodes: ids.map(function (i) {
        var a = JSON.parse(JSON.stringify(N[i].attrs));
        if (owner[N[i].id] !== undefined) { a.supernode = owner[N[i].id]; }
        a.id = N[i].id;
        return a;
      }),
      edges: E.filter(function (e) { return keep[e[0]] && keep[e[1]]; }).map(function (e) {
        return {weight: e[2], cross_position: e[3], source: N[e[0]].id, target: N[e[1]].id};
      })};
    return JSON.stringify(out, null, 1);
  }
  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  // The current view (visible nodes and edges, rows and tokens) as a standalone SVG.
  function exportSVG() {
    var L = 120, B = 40, w = width + L + 20, h = height + B + 20;
    var o = ['<svg xmlns="http:\/\/www.w3.org\/2000\/svg" width="' + w + '" height="' + h + '" font-family="sans-serif" font-size="11">'];
    o.push('<g transform="translate(' + L + ',' + (RH / 2 + 10) + ')">');
    for (var r = 0; r < nRows; r++) {
      o.push('<rect x="0" y="' + (rowY(r) - RH / 2) + '" width="' + width + '" height="' + RH + '" fill="' + (r % 2 ? "#f3f4f6" : "#fff") + '"/>');
      o.push('<text x="-6" y="' + (rowY(r) + 4) + '" text-anchor="end">' + esc(rowName[r]) + "</text>");
    }
    visEdges.forEach(function (i) {
      var e = E[i], u = N[e[0]], v = N[e[1]];
      o.push('<line x1="' + u.x + '" y1="' + u.y + '" x2="' + v.x + '" y2="' + v.y + '" stroke="rgb(' + (e[2] < 0 ? NEG : POS) +
        ')" stroke-opacity="' + BUCKETS[bucketOf(e[2])][0] + '" stroke-width="' + BUCKETS[bucketOf(e[2])][1] + '"/>');
    });
    N.forEach(function (n, i) {
      if (!nodeOn[i]) { return; }
      o.push('<circle cx="' + n.x + '" cy="' + n.y + '" r="5" fill="' + colorOf(n) + '"><title>' + esc(nodeName(n) + " " + shortLabel(n)) + "</title></circle>");
    });
    for (var c = 0; c < D.n_cols; c++) {
      o.push('<text x="' + colMid(c) + '" y="' + (height - RH / 2 + 18) + '" text-anchor="middle" font-family="monospace">' +
        esc(showTok(D.tokens[c] || "")) + "</text>");
    }
    o.push("</g></svg>");
    return o.join("\n");
  }
  function download(name, mime, data) {
    var a = document.createElement("a");
    a.href = typeof data === "string" && data.indexOf("data:") === 0 ? data : URL.createObjectURL(new Blob([data], {type: mime}));
    a.download = name;
    document.body.appendChild(a); a.click(); a.remove();
  }
  document.getElementById("vpd-export-json").addEventListener("click", function () { download("subgraph.json", "application/json", exportJSON()); });
  document.getElementById("vpd-export-svg").addEventListener("click", function () { download("graph.svg", "image/svg+xml", exportSVG()); });
  document.getElementById("vpd-export-png").addEventListener("click", function () {
    download("graph.png", "image/png", container.querySelector("canvas").toDataURL("image/png"));
  });

  // ---- start --------------------------------------------------------------------------------
  readHash();
  useLayout(state.layout);
  if (rowsButton) {
    rowsButton.addEventListener("click", function () {
      useLayout(state.layout === "block" ? "matrix" : "block");
      moved = false; home(); changed();
    });
  }
  nodeSlider.value = state.nt; edgeSlider.value = state.et;
  applyPrune();
  if (state.sel !== null) { network.selectNodes([state.sel]); }
  renderSelected(); renderPinned();
  home();
  window.vpdExplorer = {exportJSON: exportJSON, exportSVG: exportSVG, state: state, select: select, togglePin: togglePin,
    group: group, home: home, nodeCount: function () { return +counts.getAttribute("data-nodes"); },
    hoverCard: function (id) { return hoverCard(N[indexOf[id]]); }, useLayout: function (name) {
      useLayout(name); home(); changed();
    }};
})();
