// The explorer: every image as a thumbnail on one canvas, laid out on the 2-D map or
// binned in a grid, colored, filtered, zoomable. Data comes from data.js (written by
// stages/explore.py) as columns. Values from the data are only ever set as text
// (textContent, fillText, attributes through properties), never parsed as markup.
"use strict";

(function () {
  const data = window.EXPLORER_DATA;
  const $ = (id) => document.getElementById(id);

  if (!data) {
    $("message").hidden = false;
    $("message").textContent = "data.js is missing: run `dvc repro explore`.";
    return;
  }

  const count = data.count;
  const col = data.columns;
  // List columns travel flat (explore.py's RowLists): each row's count, then every row's
  // values in a row, as integers `scale` times the value.
  const rowLists = (flat) => {
    const lists = new Array(flat.counts.length);
    let start = 0;
    flat.counts.forEach((length, i) => {
      const values = flat.values.slice(start, start + length);
      lists[i] = flat.scale === 1 ? values : values.map((v) => v / flat.scale);
      start += length;
    });
    return lists;
  };
  for (const name of ["similar", "patterns", "pattern_scores"]) col[name] = rowLists(col[name]);
  // Other clusterings (clusterings/ in the project) are fields "compare-0", "compare-1"...
  // of the columns: their names come from file names, so they never become keys.
  const clusterings = data.clusterings || [];
  clusterings.forEach((clustering, k) => {
    col["compare-" + k] = clustering.clusters;
  });
  const spriteWidth = data.sprite.width;
  const spriteHeight = data.sprite.height;
  const NONE = "(none)";
  const NOISE = -1;
  const ZOOM_STEP = 1.5;
  const CLICK_SLOP = 5; // px a press may move and still count as a click
  const MIN_THUMB_PX = 4; // below this on screen, draw colored cells, not thumbnails

  // ------------------------------------------------------------------ state

  const state = {
    layout: "map",
    binBy: "cluster",
    colorBy: "cluster",
    filterCluster: "all",
    filterPattern: "all", // "all", or a pattern's number: the images that hold it
    silhouetteMin: null,
    silhouetteMax: null,
    text: "",
    showCopies: false, // near-duplicate copies hidden: each group shows its representative
    onlySelected: false,
    selected: -1, // the image whose details are open
  };
  const selection = new Uint8Array(count); // 1: in the lasso selection
  let selectedCount = 0;
  const view = { scale: 1, x: 0, y: 0 }; // screen = world * scale + (x, y), CSS px
  let visible = new Int32Array(0); // indices of the shown images, in the page's order
  const worldX = new Float32Array(count);
  const worldY = new Float32Array(count);
  let groups = []; // grid layout: {label, count, x, y, width, height}
  let bounds = { left: 0, top: 0, right: 1, bottom: 1 };
  let palette = []; // CSS colors
  let paletteRgb = []; // the same as [r, g, b], for the GPU
  let colorIndex = new Uint16Array(count); // per image, its color in the palette
  let legendEntries = [];

  const canvas = $("view");
  const labels = $("labels").getContext("2d"); // group labels, over the WebGL canvas
  let renderer = null;
  try {
    renderer = window.createExplorerRenderer(canvas, data, { changed: requestDraw, failed: showMessage });
  } catch (error) {
    showMessage("The explorer could not start WebGL2 drawing: " + error.message);
  }
  if (!renderer && $("message").hidden) {
    showMessage("This page draws with WebGL2, which this browser does not offer: " +
      "try a recent Chrome, Firefox, Edge or Safari with hardware acceleration on.");
  }

  function showMessage(text) {
    $("message").hidden = false;
    $("message").textContent = text;
  }

  // ------------------------------------------------------------------ values

  function fieldValue(field, index) {
    const value = col[field][index];
    return value === null || value === undefined ? NONE : String(value);
  }

  function isClustering(field) {
    // Fields of numbered groups: clusters, other clusterings, visual patterns.
    return field === "cluster" || field === "pattern" || field.startsWith("compare-");
  }

  function fieldName(field) {
    // How the page names a field: another clustering by its own name.
    return field.startsWith("compare-") ? clusterings[Number(field.slice(8))].name : field;
  }

  function categoryOrder(field, values) {
    // Clusters in numeric order (noise, then none, last), months in time order, others
    // by size.
    const counts = new Map();
    for (const value of values) counts.set(value, (counts.get(value) || 0) + 1);
    const keys = Array.from(counts.keys());
    if (isClustering(field)) {
      keys.sort((a, b) => {
        const na = a === NONE ? Infinity : Number(a), nb = b === NONE ? Infinity : Number(b);
        return (na === NOISE) - (nb === NOISE) || (na > nb) - (na < nb);
      });
    } else if (field === "month") {
      keys.sort((a, b) => (a === NONE) - (b === NONE) || (a < b ? -1 : a > b ? 1 : 0));
    } else {
      keys.sort((a, b) => counts.get(b) - counts.get(a) || (a < b ? -1 : a > b ? 1 : 0));
    }
    return keys.map((key) => ({ key, count: counts.get(key) }));
  }

  function categoryColor(position, key) {
    if (key === NONE || key === String(NOISE)) return "#777777";
    const hue = (position * 137.508) % 360; // golden angle: neighbours differ
    return "hsl(" + hue.toFixed(1) + ", 70%, 55%)";
  }

  const SILHOUETTE_STOPS = [
    [-1, [68, 1, 84]],
    [-0.25, [59, 82, 139]],
    [0.25, [33, 145, 140]],
    [0.6, [94, 201, 98]],
    [1, [253, 231, 37]],
  ];

  function silhouetteColor(value) {
    if (value === null || value === undefined) return "#777777";
    for (let i = 1; i < SILHOUETTE_STOPS.length; i += 1) {
      const [high, highColor] = SILHOUETTE_STOPS[i];
      if (value <= high || i === SILHOUETTE_STOPS.length - 1) {
        const [low, lowColor] = SILHOUETTE_STOPS[i - 1];
        const t = Math.min(1, Math.max(0, (value - low) / (high - low)));
        const rgb = lowColor.map((c, k) => Math.round(c + t * (highColor[k] - c)));
        return "rgb(" + rgb.join(",") + ")";
      }
    }
    return "#777777";
  }

  const SILHOUETTE_STEPS = 40; // silhouettes are colored in steps of 0.05

  function computeColors() {
    colorIndex = new Uint16Array(count);
    legendEntries = [];
    if (state.colorBy === "silhouette") {
      palette = [];
      for (let step = 0; step <= SILHOUETTE_STEPS; step += 1) {
        palette.push(silhouetteColor(-1 + (2 * step) / SILHOUETTE_STEPS));
      }
      palette.push("#777777"); // no silhouette: noise
      for (let i = 0; i < count; i += 1) {
        const value = col.silhouette[i];
        colorIndex[i] = value === null
          ? SILHOUETTE_STEPS + 1
          : Math.round(((Math.max(-1, Math.min(1, value)) + 1) / 2) * SILHOUETTE_STEPS);
      }
      legendEntries = [
        { gradient: true, label: "-1 \u2026 1" },
        { color: "#777777", label: "none (noise)" },
      ];
    } else {
      computeCategoryColors(state.colorBy);
    }
    paletteRgb = palette.map(cssRgb);
    stylesChanged();
  }

  const colorProbe = document.createElement("canvas").getContext("2d", { willReadFrequently: true });

  function cssRgb(color) {
    // A CSS color as [r, g, b] bytes, as the browser itself reads it.
    colorProbe.clearRect(0, 0, 1, 1);
    colorProbe.fillStyle = color;
    colorProbe.fillRect(0, 0, 1, 1);
    return Array.from(colorProbe.getImageData(0, 0, 1, 1).data.slice(0, 3));
  }

  function computeCategoryColors(field) {
    const values = [];
    for (let i = 0; i < count; i += 1) values.push(fieldValue(field, i));
    const order = categoryOrder(field, values);
    const indexOf = new Map();
    palette = order.map((entry, position) => {
      const color = categoryColor(position, entry.key);
      indexOf.set(entry.key, position);
      legendEntries.push({ color, label: fieldName(field) + " " + entry.key, count: entry.count });
      return color;
    });
    for (let i = 0; i < count; i += 1) colorIndex[i] = indexOf.get(values[i]);
  }

  // ------------------------------------------------------------------ filter and layout

  function passes(i) {
    if (!state.showCopies && col.near_of[i] !== null) return false;
    if (state.onlySelected && !selection[i]) return false;
    if (state.filterPattern !== "all" && !(col.patterns && col.patterns[i].includes(state.filterPattern))) {
      return false;
    }
    if (state.filterCluster !== "all" && String(col.cluster[i]) !== state.filterCluster) {
      return false;
    }
    const s = col.silhouette[i];
    if (state.silhouetteMin !== null && (s === null || s < state.silhouetteMin)) return false;
    if (state.silhouetteMax !== null && (s === null || s > state.silhouetteMax)) return false;
    if (state.text) {
      const id = col.id[i].toLowerCase();
      const place = (col.place[i] || "").toLowerCase();
      if (!id.includes(state.text) && !place.includes(state.text)) return false;
    }
    return true;
  }

  function applyFilter() {
    const shown = [];
    for (let i = 0; i < count; i += 1) if (passes(i)) shown.push(i);
    visible = Int32Array.from(shown);
    $("shown").textContent = visible.length.toLocaleString("en-US");
    $("total").textContent = count.toLocaleString("en-US");
    if (state.selected >= 0 && !passes(state.selected)) closeDetail();
  }

  function layoutMap() {
    // The cluster stage's 2-D map, scaled to a square world about sqrt(n) cells wide.
    let minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
    for (let i = 0; i < count; i += 1) {
      minX = Math.min(minX, col.x[i]); maxX = Math.max(maxX, col.x[i]);
      minY = Math.min(minY, col.y[i]); maxY = Math.max(maxY, col.y[i]);
    }
    const side = Math.max(spriteWidth, spriteHeight) * Math.max(4, Math.sqrt(count) * 1.6);
    const spanX = maxX - minX || 1, spanY = maxY - minY || 1;
    for (let i = 0; i < count; i += 1) {
      worldX[i] = ((col.x[i] - minX) / spanX) * side;
      worldY[i] = (1 - (col.y[i] - minY) / spanY) * side; // y grows upwards on a map
    }
    groups = [];
    bounds = { left: 0, top: 0, right: side + spriteWidth, bottom: side + spriteHeight };
  }

  function layoutGrid() {
    // One block per value of the bin field, each about square; blocks flow in rows.
    const field = state.binBy;
    const members = new Map();
    const values = [];
    for (const i of visible) values.push(fieldValue(field, i));
    for (const entry of categoryOrder(field, values)) members.set(entry.key, []);
    visible.forEach((i, k) => members.get(values[k]).push(i));
    const gap = spriteWidth;
    const labelSpace = spriteHeight * 1.5;
    const area = visible.length * spriteWidth * spriteHeight;
    const rowWidth = Math.max(spriteWidth * 8, Math.sqrt(area) * 2);
    groups = [];
    let x = 0, y = labelSpace, lineHeight = 0, right = 0;
    for (const [key, indices] of members) {
      const columns = Math.max(1, Math.ceil(Math.sqrt(indices.length * spriteHeight / spriteWidth)));
      const width = columns * spriteWidth;
      const height = Math.ceil(indices.length / columns) * spriteHeight;
      if (x > 0 && x + width > rowWidth) {
        x = 0;
        y += lineHeight + labelSpace + gap;
        lineHeight = 0;
      }
      indices.forEach((i, k) => {
        worldX[i] = x + (k % columns) * spriteWidth;
        worldY[i] = y + Math.floor(k / columns) * spriteHeight;
      });
      groups.push({ key, label: fieldName(field) + " " + key, count: indices.length, x, y, width, height });
      x += width + gap;
      right = Math.max(right, x);
      lineHeight = Math.max(lineHeight, height);
    }
    bounds = { left: 0, top: 0, right: Math.max(right, 1), bottom: y + lineHeight + gap };
  }

  function placeSetAside(indices, label, top) {
    // The images a layout cannot place (no location, no time) in one labelled block
    // below it: counted and shown, not dropped. Returns the block's bottom.
    if (indices.length === 0) return top;
    const columns = Math.max(1, Math.ceil(Math.sqrt(indices.length * spriteHeight / spriteWidth)));
    const y = top + spriteHeight * 1.5;
    indices.forEach((i, k) => {
      worldX[i] = (k % columns) * spriteWidth;
      worldY[i] = y + Math.floor(k / columns) * spriteHeight;
    });
    const height = Math.ceil(indices.length / columns) * spriteHeight;
    groups.push({ key: "set-aside", label, count: indices.length, x: 0, y, width: columns * spriteWidth, height });
    bounds.right = Math.max(bounds.right, columns * spriteWidth);
    return y + height;
  }

  function located(i) {
    return col.latitude[i] !== null && col.longitude[i] !== null;
  }

  function layoutPlace() {
    // Longitude across, latitude up, one scale for both (equirectangular), over the
    // extent of every located image on the page: filtering does not move them.
    let minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
    for (let i = 0; i < count; i += 1) {
      if (!located(i)) continue;
      minX = Math.min(minX, col.longitude[i]); maxX = Math.max(maxX, col.longitude[i]);
      minY = Math.min(minY, col.latitude[i]); maxY = Math.max(maxY, col.latitude[i]);
    }
    const side = Math.max(spriteWidth, spriteHeight) * Math.max(4, Math.sqrt(count) * 1.6);
    const span = Math.max(maxX - minX, maxY - minY) || 1;
    const unit = side / span;
    const placed = [], missing = [];
    for (const i of visible) (located(i) ? placed : missing).push(i);
    for (const i of placed) {
      worldX[i] = (col.longitude[i] - minX) * unit;
      worldY[i] = (maxY - col.latitude[i]) * unit; // north up
    }
    const width = placed.length ? (maxX - minX) * unit + spriteWidth : 0;
    const height = placed.length ? (maxY - minY) * unit + spriteHeight : 0;
    groups = placed.length
      ? [{ key: "located", label: "with a location", count: placed.length, x: 0, y: 0, width, height }]
      : [];
    bounds = { left: 0, top: -spriteHeight * 1.5, right: Math.max(width, 1), bottom: height };
    bounds.bottom = placeSetAside(missing, "no location", height + spriteWidth);
  }

  let takenSeconds = null; // per image, seconds since 1970 (NaN: no time), parsed once

  function takenTimes() {
    if (takenSeconds) return takenSeconds;
    takenSeconds = new Float64Array(count);
    for (let i = 0; i < count; i += 1) {
      const text = col.taken_at[i]; // "YYYY-MM-DD HH:MM:SS", as written by explore
      takenSeconds[i] = text === null ? NaN : Date.parse(text.replace(" ", "T") + "Z") / 1000;
    }
    return takenSeconds;
  }

  function timeLabel(seconds, span) {
    // As fine as the timeline's span needs: months over years, days over days, else minutes.
    const text = new Date(seconds * 1000).toISOString();
    if (span > 2 * 365 * 86400) return text.slice(0, 7);
    if (span > 2 * 86400) return text.slice(0, 10);
    return text.slice(0, 16).replace("T", " ");
  }

  const TIME_BINS = 48;

  function layoutTime() {
    // A histogram of thumbnails: equal spans of time across, each bin's images stacked
    // upwards in time order, the whole about square.
    const times = takenTimes();
    let first = Infinity, last = -Infinity;
    for (let i = 0; i < count; i += 1) {
      if (Number.isNaN(times[i])) continue;
      first = Math.min(first, times[i]);
      last = Math.max(last, times[i]);
    }
    const timed = [], missing = [];
    for (const i of visible) (Number.isNaN(times[i]) ? missing : timed).push(i);
    timed.sort((a, b) => times[a] - times[b] || a - b);
    const across = Math.max(1, Math.round(Math.sqrt((count * spriteHeight) / spriteWidth)));
    const binCount = Math.min(TIME_BINS, across);
    const binColumns = Math.max(1, Math.ceil(across / binCount));
    const span = last - first || 1;
    const bins = Array.from({ length: binCount }, () => []);
    for (const i of timed) {
      bins[Math.min(binCount - 1, Math.floor(((times[i] - first) / span) * binCount))].push(i);
    }
    const binWidth = binColumns * spriteWidth;
    const gap = spriteWidth * 0.25;
    const rowsOf = (members) => Math.ceil(members.length / binColumns);
    const baseline = Math.max(0, ...bins.map(rowsOf)) * spriteHeight;
    groups = [];
    bins.forEach((members, b) => {
      const x = b * (binWidth + gap);
      members.forEach((i, k) => {
        worldX[i] = x + (k % binColumns) * spriteWidth;
        worldY[i] = baseline - (Math.floor(k / binColumns) + 1) * spriteHeight;
      });
      if (members.length === 0) return;
      const height = rowsOf(members) * spriteHeight;
      const label = timeLabel(first + (b * span) / binCount, span);
      groups.push({ key: "bin " + b, label, count: members.length, x, y: baseline - height, width: binWidth, height });
    });
    bounds = { left: 0, top: -spriteHeight * 1.5, right: binCount * (binWidth + gap), bottom: baseline };
    bounds.bottom = placeSetAside(missing, "no time taken", baseline + spriteWidth);
  }

  const LAYOUTS = { map: layoutMap, grid: layoutGrid, place: layoutPlace, time: layoutTime };

  function relayout(fit) {
    applyFilter();
    LAYOUTS[state.layout]();
    renderGroups();
    if (fit) fitView();
    positionsChanged();
  }

  // ------------------------------------------------------------------ view

  function canvasSize() {
    return { width: canvas.clientWidth, height: canvas.clientHeight };
  }

  function fitView() {
    const { width, height } = canvasSize();
    const margin = 20;
    const worldWidth = bounds.right - bounds.left, worldHeight = bounds.bottom - bounds.top;
    view.scale = Math.max(
      1e-4,
      Math.min((width - 2 * margin) / worldWidth, (height - 2 * margin) / worldHeight)
    );
    view.x = (width - worldWidth * view.scale) / 2 - bounds.left * view.scale;
    view.y = (height - worldHeight * view.scale) / 2 - bounds.top * view.scale;
    requestDraw();
  }

  function zoomAt(factor, screenX, screenY) {
    const scale = Math.min(64, Math.max(1e-4, view.scale * factor));
    view.x = screenX - ((screenX - view.x) * scale) / view.scale;
    view.y = screenY - ((screenY - view.y) * scale) / view.scale;
    view.scale = scale;
    requestDraw();
  }

  // A frame is drawn on the next animation frame after anything changes. The GPU
  // buffers follow the page: positions when the layout or filter changes, colors and
  // outlines when colors, the selection or the opened image change.
  const REST_MS = 150; // after the view rests this long, full-size atlases are chosen
  let drawPending = false, restTimer = 0, positionsStale = true, stylesStale = true;

  function requestDraw() {
    window.clearTimeout(restTimer);
    restTimer = window.setTimeout(chooseFullAtlases, REST_MS);
    if (drawPending) return;
    drawPending = true;
    window.requestAnimationFrame(() => {
      drawPending = false;
      draw();
    });
  }

  function positionsChanged() {
    positionsStale = true;
    requestDraw();
  }

  function stylesChanged() {
    stylesStale = true;
    requestDraw();
  }

  function detailLevel() {
    // 0: colored cells; 1: icons; 2: full-size sprites where their atlas is loaded.
    if (!renderer || spriteWidth * view.scale < MIN_THUMB_PX) return 0;
    return spriteHeight * view.scale > renderer.iconSize.height * 1.25 ? 2 : 1;
  }

  function viewRect() {
    // The world rectangle on screen, widened by a sprite: images that touch it.
    const { width, height } = canvasSize();
    return {
      left: -view.x / view.scale - spriteWidth, right: (width - view.x) / view.scale,
      top: -view.y / view.scale - spriteHeight, bottom: (height - view.y) / view.scale,
    };
  }

  function chooseFullAtlases() {
    // Zoomed in: the atlases of the images in view, those with the most images first.
    if (detailLevel() < 2) return;
    syncBuffers();
    const { left, right, top, bottom } = viewRect();
    const inView = new Map();
    for (const i of renderer.imagesIn(viewRect())) {
      const x = worldX[i], y = worldY[i];
      if (x < left || x > right || y < top || y > bottom) continue;
      const k = renderer.atlasOf(i);
      inView.set(k, (inView.get(k) || 0) + 1);
    }
    renderer.wantFull(Array.from(inView.keys()).sort((a, b) => inView.get(b) - inView.get(a) || a - b));
  }

  let lastDrawMs = 0;
  let lastFrame = ""; // how the renderer drew the last frame: "overview" or "images N"

  function syncBuffers() {
    // The GPU buffers (and the renderer's index of where images are) as the page is now.
    if (positionsStale) {
      renderer.setInstances(visible, worldX, worldY, layoutBounds());
      positionsStale = false;
      stylesStale = true;
    }
    if (stylesStale) {
      renderer.setStyles((i) => paletteRgb[colorIndex[i]], (i) => selection[i] === 1, state.selected);
      stylesStale = false;
    }
  }

  function layoutBounds() {
    // The world rectangle holding every shown image (set-aside blocks included).
    let left = bounds.left, right = bounds.right, top = bounds.top, bottom = bounds.bottom;
    for (const i of visible) {
      left = Math.min(left, worldX[i]); right = Math.max(right, worldX[i] + spriteWidth);
      top = Math.min(top, worldY[i]); bottom = Math.max(bottom, worldY[i] + spriteHeight);
    }
    return { left, top, right, bottom };
  }
  let firstFrameAt = null; // ms since the page began loading
  function draw() {
    const started = performance.now();
    const { width, height } = canvasSize();
    const ratio = window.devicePixelRatio || 1;
    if (renderer) {
      syncBuffers();
      lastFrame = renderer.draw(view, width, height, ratio, detailLevel());
    }
    drawLabels(width, height, ratio);
    lastDrawMs = performance.now() - started;
    if (firstFrameAt === null) firstFrameAt = performance.now();
  }

  function drawLabels(width, height, ratio) {
    const target = labels.canvas;
    if (target.width !== Math.round(width * ratio) || target.height !== Math.round(height * ratio)) {
      target.width = Math.round(width * ratio);
      target.height = Math.round(height * ratio);
    }
    labels.setTransform(1, 0, 0, 1, 0, 0);
    labels.clearRect(0, 0, target.width, target.height);
    labels.setTransform(ratio, 0, 0, ratio, 0, 0);
    labels.fillStyle = "#e6e6e6";
    labels.font = "12px system-ui, sans-serif";
    labels.textBaseline = "bottom";
    for (const group of groups) {
      const sx = group.x * view.scale + view.x, sy = group.y * view.scale + view.y - 3;
      if (sx > width || sy < 0 || sy > height + 12) continue;
      labels.fillText(group.label + " (" + group.count + ")", sx, sy);
    }
  }

  // ------------------------------------------------------------------ picking and detail

  function imageAt(screenX, screenY) {
    const x = (screenX - view.x) / view.scale, y = (screenY - view.y) / view.scale;
    if (renderer) syncBuffers(); // a click may come before the frame after a change
    const near = renderer
      ? renderer.imagesIn({ left: x - spriteWidth, right: x, top: y - spriteHeight, bottom: y })
      : visible;
    for (let k = near.length - 1; k >= 0; k -= 1) {
      const i = near[k]; // drawn last = on top
      if (x >= worldX[i] && x < worldX[i] + spriteWidth && y >= worldY[i] && y < worldY[i] + spriteHeight) {
        return i;
      }
    }
    return -1;
  }

  function collectionUrl(path) {
    // Each segment percent-encoded: a name with '#', '?', '<' or spaces stays a file name.
    return data.collection + path.split("/").map(encodeURIComponent).join("/");
  }

  function formatNumber(value, digits) {
    return value === null || value === undefined ? "" : Number(value).toFixed(digits);
  }

  function openDetail(i) {
    state.selected = i;
    $("detail").hidden = false;
    $("detail-id").textContent = col.id[i];
    const url = collectionUrl(col.path[i]);
    $("detail-link").href = url;
    $("detail-image").src = url;
    $("detail-image").onload = (event) => {
      // Tiny originals (the demo's 32 px digits) are enlarged as pixels, not blurred.
      event.target.classList.toggle("small", event.target.naturalWidth < 160);
    };
    $("detail-image").alt = col.id[i];
    const rows = [
      ["id", col.id[i]],
      ["cluster", String(col.cluster[i])],
      ["silhouette", formatNumber(col.silhouette[i], 3)],
      ["taken at", col.taken_at[i] || ""],
      ["place", col.place[i] || ""],
      ["latitude", formatNumber(col.latitude[i], 4)],
      ["longitude", formatNumber(col.longitude[i], 4)],
      ["label", col.label[i] || ""],
      ["subset", col.subset[i] || ""],
      ["file", col.path[i]],
    ];
    if (col.blank[i]) rows.push(["flag", "blank frame"]);
    if (col.duplicate[i]) rows.push(["flag", "duplicate"]);
    if (col.patterns && col.patterns[i].length) {
      const held = col.patterns[i].map((n, k) => n + " (" + col.pattern_scores[i][k].toFixed(2) + ")");
      rows.push(["visual patterns", held.join(", ")]);
    }
    if (col.near_group[i] > 0) {
      rows.push(["near-duplicates", "group " + col.near_group[i] + " of " + col.near_size[i] + " images"]);
      rows.push(["copy of", col.near_of[i] === null ? "(the group's representative)" : col.near_of[i]]);
    }
    const list = $("detail-fields");
    list.replaceChildren();
    for (const [name, value] of rows) {
      const term = document.createElement("dt");
      term.textContent = name;
      const description = document.createElement("dd");
      description.textContent = value === "" ? "\u2014" : value;
      description.dataset.field = name;
      list.append(term, description);
    }
    showSimilar(i);
    stylesChanged();
  }

  function showSimilar(i) {
    // The nearest images on the page (health's neighbours), each opening its own details.
    const similar = $("detail-similar");
    similar.replaceChildren();
    const rows = (col.similar && col.similar[i]) || [];
    $("detail-similar-title").hidden = rows.length === 0;
    for (const j of rows) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "similar";
      button.title = col.id[j];
      button.dataset.row = String(j);
      const image = document.createElement("img");
      image.src = collectionUrl(col.path[j]);
      image.alt = col.id[j];
      button.append(image);
      button.addEventListener("click", () => openDetail(j));
      similar.append(button);
    }
  }

  function closeDetail() {
    state.selected = -1;
    $("detail").hidden = true;
    $("detail-image").removeAttribute("src");
    stylesChanged();
  }

  // ------------------------------------------------------------------ selection

  function insidePolygon(polygon, x, y) {
    // Even-odd rule: a ray to the right crosses the outline an odd number of times.
    let inside = false;
    for (let k = 0, j = polygon.length - 1; k < polygon.length; j = k, k += 1) {
      const [xk, yk] = polygon[k], [xj, yj] = polygon[j];
      if (yk > y !== yj > y && x < ((xj - xk) * (y - yk)) / (yj - yk) + xk) inside = !inside;
    }
    return inside;
  }

  function selectInLasso(screenPoints, add) {
    // The shown images whose centers lie inside the lasso (drawn in canvas px).
    const polygon = screenPoints.map(([x, y]) => [(x - view.x) / view.scale, (y - view.y) / view.scale]);
    const xs = polygon.map((point) => point[0]), ys = polygon.map((point) => point[1]);
    const left = Math.min(...xs), right = Math.max(...xs);
    const top = Math.min(...ys), bottom = Math.max(...ys);
    if (!add) selection.fill(0);
    for (const i of visible) {
      const x = worldX[i] + spriteWidth / 2, y = worldY[i] + spriteHeight / 2;
      if (x < left || x > right || y < top || y > bottom) continue;
      if (insidePolygon(polygon, x, y)) selection[i] = 1;
    }
    selectionChanged();
  }

  function selectionChanged() {
    selectedCount = 0;
    for (let i = 0; i < count; i += 1) selectedCount += selection[i];
    $("selected").textContent = selectedCount.toLocaleString("en-US");
    $("selection-save").disabled = selectedCount === 0;
    if (state.onlySelected) relayout(false);
    else stylesChanged();
  }

  function csvField(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\r\n]|^\s|\s$/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
  }

  function selectionCsv() {
    // One row per selected image, in the page's order: id, file, cluster.
    const lines = [["id", "path", "cluster"].join(",")];
    for (let i = 0; i < count; i += 1) {
      if (selection[i]) lines.push([col.id[i], col.path[i], col.cluster[i]].map(csvField).join(","));
    }
    return lines.join("\r\n") + "\r\n";
  }

  function saveSelection() {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([selectionCsv()], { type: "text/csv" }));
    link.download = "selection.csv";
    link.click();
    window.setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  }

  function showLasso(points) {
    $("lasso-path").setAttribute("points", points.map((point) => point.join(",")).join(" "));
  }

  // ------------------------------------------------------------------ side lists

  function listItem(color, label, size, gradient) {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = gradient ? "gradient" : "swatch";
    if (gradient) {
      swatch.style.background = "linear-gradient(to right, " +
        SILHOUETTE_STOPS.map(([, rgb]) => "rgb(" + rgb.join(",") + ")").join(", ") + ")";
    } else if (color) {
      swatch.style.background = color;
    }
    const text = document.createElement("span");
    text.textContent = label;
    item.append(swatch, text);
    if (size !== undefined) {
      const number = document.createElement("span");
      number.className = "size";
      number.textContent = size.toLocaleString("en-US");
      item.append(number);
    }
    return item;
  }

  function renderLegend() {
    const list = $("legend");
    list.replaceChildren();
    $("legend-title").textContent = "Colors: " + fieldName(state.colorBy);
    for (const entry of legendEntries.slice(0, 100)) {
      list.append(listItem(entry.color, entry.label, entry.count, entry.gradient));
    }
    if (legendEntries.length > 100) list.append(listItem(null, "\u2026 and " + (legendEntries.length - 100) + " more"));
  }

  function renderGroups() {
    const list = $("groups");
    list.replaceChildren();
    for (const group of groups) {
      const item = listItem(null, group.label, group.count);
      item.dataset.key = group.key;
      list.append(item);
    }
  }

  function fillPatternFilter() {
    // Each visual pattern with how many images on the page hold it, by number.
    const holders = new Map();
    for (let i = 0; i < count; i += 1) {
      for (const n of (col.patterns && col.patterns[i]) || []) holders.set(n, (holders.get(n) || 0) + 1);
    }
    const select = $("filter-pattern");
    for (const n of Array.from(holders.keys()).sort((a, b) => a - b)) {
      const option = document.createElement("option");
      option.value = String(n);
      option.textContent = "pattern " + n + " (" + holders.get(n) + ")";
      select.append(option);
    }
  }

  function fillClusterFilter() {
    const select = $("filter-cluster");
    const values = [];
    for (let i = 0; i < count; i += 1) values.push(String(col.cluster[i]));
    for (const entry of categoryOrder("cluster", values)) {
      const option = document.createElement("option");
      option.value = entry.key;
      option.textContent = (entry.key === String(NOISE) ? "noise" : "cluster " + entry.key) +
        " (" + entry.count + ")";
      select.append(option);
    }
  }

  // ------------------------------------------------------------------ overview tab

  function cell(row, value, className) {
    const td = document.createElement("td");
    td.textContent = value;
    if (className) td.className = className;
    row.append(td);
    return td;
  }

  function barCell(row, share, negative) {
    const td = cell(row, "", "bar-cell");
    const bar = document.createElement("div");
    bar.className = negative ? "bar bar-negative" : "bar";
    bar.style.width = (Math.max(0, Math.min(1, share)) * 100).toFixed(1) + "%";
    td.append(bar);
  }

  function renderOverview() {
    const summary = data.summary;
    const summaryRows = [
      ["images in the collection", summary.collection_images],
      ["images clustered", summary.clustered_images],
      ["images on this page", summary.shown_images],
      ["rejected files", summary.rejected_files],
      ["with a timestamp", summary.with_timestamp],
      ["with a location", summary.with_location],
      ["blank frames", summary.blank_images],
      ["duplicates", summary.duplicate_images],
      ["near-duplicate groups", summary.near_groups],
      ["near-duplicate copies", summary.near_copies],
    ];
    const table = $("summary");
    table.replaceChildren();
    for (const [name, value] of summaryRows) {
      const row = document.createElement("tr");
      cell(row, name);
      cell(row, Number(value).toLocaleString("en-US"), "number");
      row.dataset.key = name;
      table.append(row);
    }

    const sizes = new Map(), sums = new Map(), scored = new Map();
    for (let i = 0; i < count; i += 1) {
      const key = String(col.cluster[i]);
      sizes.set(key, (sizes.get(key) || 0) + 1);
      if (col.silhouette[i] !== null) {
        sums.set(key, (sums.get(key) || 0) + col.silhouette[i]);
        scored.set(key, (scored.get(key) || 0) + 1);
      }
    }
    const largest = Math.max(1, ...sizes.values());
    const body = $("cluster-table").tBodies[0];
    body.replaceChildren();
    for (const { key } of categoryOrder("cluster", Array.from(sizes.keys()))) {
      const row = document.createElement("tr");
      row.dataset.cluster = key;
      cell(row, key === String(NOISE) ? "noise" : key);
      cell(row, sizes.get(key).toLocaleString("en-US"), "number");
      barCell(row, sizes.get(key) / largest, false);
      const mean = scored.get(key) ? sums.get(key) / scored.get(key) : null;
      cell(row, mean === null ? "" : mean.toFixed(3), "number");
      if (mean === null) cell(row, "");
      else barCell(row, Math.abs(mean), mean < 0);
      body.append(row);
    }

    const subsets = new Map();
    for (let i = 0; i < count; i += 1) {
      const key = fieldValue("subset", i);
      subsets.set(key, (subsets.get(key) || 0) + 1);
    }
    const subsetTable = $("subset-table");
    subsetTable.replaceChildren();
    for (const [key, size] of subsets) {
      const row = document.createElement("tr");
      cell(row, key);
      cell(row, size.toLocaleString("en-US"), "number");
      subsetTable.append(row);
    }
  }

  // ------------------------------------------------------------------ compare clusterings

  const CROSS_LIMIT = 60; // rows or columns of the cross-table; the smallest beyond go to "other"

  function crossKeys(field) {
    // The categories of a clustering on the page, the largest CROSS_LIMIT - 1 kept when
    // there are more: returns the keys in order and each image's position among them.
    const values = [];
    for (let i = 0; i < count; i += 1) values.push(fieldValue(field, i));
    let order = categoryOrder(field, values);
    if (order.length > CROSS_LIMIT) {
      const largest = new Set(
        order.slice().sort((a, b) => b.count - a.count).slice(0, CROSS_LIMIT - 1).map((e) => e.key)
      );
      order = order.filter((entry) => largest.has(entry.key)).concat([{ key: "other" }]);
    }
    const position = new Map(order.map((entry, k) => [entry.key, k]));
    const other = order.length - 1;
    const of = values.map((value) => (position.has(value) ? position.get(value) : other));
    return { keys: order.map((entry) => entry.key), of };
  }

  function renderCrossTable() {
    const rowField = $("cross-rows").value, columnField = $("cross-columns").value;
    const rows = crossKeys(rowField), columns = crossKeys(columnField);
    const counts = new Uint32Array(rows.keys.length * columns.keys.length);
    const totals = new Uint32Array(rows.keys.length);
    for (let i = 0; i < count; i += 1) {
      counts[rows.of[i] * columns.keys.length + columns.of[i]] += 1;
      totals[rows.of[i]] += 1;
    }
    const table = $("cross-table");
    table.replaceChildren();
    const head = document.createElement("tr");
    cell(head, fieldName(rowField) + " \\ " + fieldName(columnField), "corner");
    for (const key of columns.keys) cell(head, key, "number");
    cell(head, "images", "number");
    table.append(head);
    rows.keys.forEach((key, r) => {
      const row = document.createElement("tr");
      row.dataset.key = key;
      cell(row, key);
      columns.keys.forEach((columnKey, c) => {
        const value = counts[r * columns.keys.length + c];
        const td = cell(row, value ? value.toLocaleString("en-US") : "", "number");
        td.dataset.column = columnKey;
        if (value) td.style.background = "rgba(255, 204, 51, " + (0.7 * value / totals[r]).toFixed(3) + ")";
      });
      cell(row, totals[r].toLocaleString("en-US"), "number");
      table.append(row);
    });
  }

  function renderComparison() {
    $("compare-section").hidden = clusterings.length === 0;
    if (clusterings.length === 0) return;
    const body = $("agreement-table").tBodies[0];
    body.replaceChildren();
    for (const clustering of clusterings) {
      const row = document.createElement("tr");
      row.dataset.name = clustering.name;
      cell(row, clustering.name);
      cell(row, clustering.images.toLocaleString("en-US"), "number");
      cell(row, clustering.cluster_count.toLocaleString("en-US"), "number");
      cell(row, clustering.shared.toLocaleString("en-US"), "number");
      cell(row, clustering.ari === null ? "" : clustering.ari.toFixed(3), "number");
      cell(row, clustering.nmi === null ? "" : clustering.nmi.toFixed(3), "number");
      body.append(row);
    }
    const fields = ["cluster"].concat(clusterings.map((_, k) => "compare-" + k));
    for (const [id, chosen] of [["cross-rows", "cluster"], ["cross-columns", "compare-0"]]) {
      const select = $(id);
      for (const field of fields) {
        const option = document.createElement("option");
        option.value = field;
        option.textContent = field === "cluster" ? "this run" : fieldName(field);
        select.append(option);
      }
      select.value = chosen;
      select.addEventListener("change", renderCrossTable);
    }
    renderCrossTable();
  }

  function addClusteringOptions() {
    // Bin by and color by any other clustering too.
    clusterings.forEach((clustering, k) => {
      for (const id of ["bin-by", "color-by"]) {
        const option = document.createElement("option");
        option.value = "compare-" + k;
        option.textContent = "clustering " + clustering.name;
        $(id).append(option);
      }
    });
  }

  function showTab(name) {
    const overview = name === "overview";
    $("overview-view").hidden = !overview;
    $("explorer-view").hidden = overview;
    $("tab-overview").setAttribute("aria-selected", String(overview));
    $("tab-explorer").setAttribute("aria-selected", String(!overview));
    if (!overview) requestDraw();
  }

  // ------------------------------------------------------------------ events

  function readNumber(input) {
    const value = input.value.trim();
    if (value === "") return null;
    const number = Number(value);
    return Number.isFinite(number) ? number : null;
  }

  $("layout").addEventListener("change", (event) => {
    state.layout = event.target.value;
    relayout(true);
  });
  $("bin-by").addEventListener("change", (event) => {
    state.binBy = event.target.value;
    if (state.layout === "grid") relayout(true);
  });
  $("color-by").addEventListener("change", (event) => {
    state.colorBy = event.target.value;
    computeColors();
    renderLegend();
  });
  $("filter-pattern").addEventListener("change", (event) => {
    state.filterPattern = event.target.value === "all" ? "all" : Number(event.target.value);
    relayout(state.layout === "grid");
  });
  $("filter-cluster").addEventListener("change", (event) => {
    state.filterCluster = event.target.value;
    relayout(state.layout === "grid");
  });
  for (const id of ["silhouette-min", "silhouette-max"]) {
    $(id).addEventListener("input", () => {
      state.silhouetteMin = readNumber($("silhouette-min"));
      state.silhouetteMax = readNumber($("silhouette-max"));
      relayout(false);
    });
  }
  $("filter-text").addEventListener("input", (event) => {
    state.text = event.target.value.trim().toLowerCase();
    relayout(false);
  });
  $("show-copies").addEventListener("change", (event) => {
    state.showCopies = event.target.checked;
    relayout(false);
  });
  $("zoom-in").addEventListener("click", () => zoomAt(ZOOM_STEP, canvas.clientWidth / 2, canvas.clientHeight / 2));
  $("zoom-out").addEventListener("click", () => zoomAt(1 / ZOOM_STEP, canvas.clientWidth / 2, canvas.clientHeight / 2));
  $("zoom-fit").addEventListener("click", fitView);
  $("only-selected").addEventListener("change", (event) => {
    state.onlySelected = event.target.checked;
    relayout(false);
  });
  $("selection-clear").addEventListener("click", () => {
    selection.fill(0);
    selectionChanged();
  });
  $("selection-save").addEventListener("click", saveSelection);
  $("detail-close").addEventListener("click", closeDetail);
  $("tab-explorer").addEventListener("click", () => showTab("explorer"));
  $("tab-overview").addEventListener("click", () => showTab("overview"));

  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    const box = canvas.getBoundingClientRect();
    zoomAt(Math.exp(-event.deltaY * 0.0015), event.clientX - box.left, event.clientY - box.top);
  }, { passive: false });

  let press = null;
  canvas.addEventListener("pointerdown", (event) => {
    const lasso = event.shiftKey || $("lasso-mode").checked;
    press = {
      x: event.clientX, y: event.clientY, viewX: view.x, viewY: view.y, moved: false,
      lasso: lasso ? [] : null, // canvas px of the lasso drawn so far
      add: event.ctrlKey || event.metaKey,
    };
    canvas.setPointerCapture(event.pointerId);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!press) return;
    const dx = event.clientX - press.x, dy = event.clientY - press.y;
    if (!press.moved && Math.hypot(dx, dy) < CLICK_SLOP) return;
    press.moved = true;
    if (press.lasso) {
      const box = canvas.getBoundingClientRect();
      if (press.lasso.length === 0) press.lasso.push([press.x - box.left, press.y - box.top]);
      press.lasso.push([event.clientX - box.left, event.clientY - box.top]);
      showLasso(press.lasso);
      return;
    }
    canvas.classList.add("dragging");
    view.x = press.viewX + dx;
    view.y = press.viewY + dy;
    requestDraw();
  });
  canvas.addEventListener("pointerup", (event) => {
    if (press && !press.moved) {
      const box = canvas.getBoundingClientRect();
      const i = imageAt(event.clientX - box.left, event.clientY - box.top);
      if (i >= 0) openDetail(i);
      else closeDetail();
    } else if (press && press.lasso && press.lasso.length >= 3) {
      selectInLasso(press.lasso, press.add);
    }
    showLasso([]);
    press = null;
    canvas.classList.remove("dragging");
  });
  window.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement) return;
    const middleX = canvas.clientWidth / 2, middleY = canvas.clientHeight / 2;
    if (event.key === "+" || event.key === "=") zoomAt(ZOOM_STEP, middleX, middleY);
    else if (event.key === "-") zoomAt(1 / ZOOM_STEP, middleX, middleY);
    else if (event.key === "0") fitView();
    else if (event.key === "Escape") closeDetail();
  });
  new ResizeObserver(() => requestDraw()).observe(canvas);

  // A small read-only handle for tests and the curious: where an image is on screen.
  window.explorer = {
    shownCount: () => visible.length,
    groupLabels: () => groups.map((group) => group.label),
    screenPointOf(id) {
      const i = col.id.indexOf(id);
      if (i < 0 || !passes(i)) return null;
      const box = canvas.getBoundingClientRect();
      return {
        x: box.left + (worldX[i] + spriteWidth / 2) * view.scale + view.x,
        y: box.top + (worldY[i] + spriteHeight / 2) * view.scale + view.y,
      };
    },
    lastDrawMs: () => lastDrawMs,
    lastFrame: () => lastFrame,
    // When the first frame was drawn and when the last icon atlas arrived, in ms since
    // the page began loading (null: not yet).
    loadTimes: () => ({ firstFrame: firstFrameAt, icons: renderer ? renderer.iconsLoadedAt() : null }),
    scale: () => view.scale,
    selectedCount: () => selectedCount,
    // Every icon atlas is on the GPU (full-size atlases come later, when zoomed in).
    atlasesLoaded: () => renderer !== null && renderer.iconsLoaded(),
    detailLevel,
    residentAtlases: () => (renderer ? renderer.residentAtlases() : []),
    atlasOf: (id) => (renderer ? renderer.atlasOf(col.id.indexOf(id)) : -1),
    useOverviewAbove(limit) {
      // Draw from the overview texture whenever more than `limit` images are in view
      // (40,000 by default): lets a test see the overview with a few images.
      if (renderer) renderer.setDirectLimit(limit);
      requestDraw();
    },
    zoomAt,
    fitView,
    draw() {
      // One frame, drawn now, and waits for the GPU to finish it: for timing.
      draw();
      if (renderer) renderer.sync();
    },
  };

  fillClusterFilter();
  fillPatternFilter();
  addClusteringOptions();
  renderComparison();
  selectionChanged();
  computeColors();
  renderLegend();
  renderOverview();
  relayout(true);
})();
