// The explorer's WebGL2 renderer. Every shown image is a quad in one GPU vertex buffer,
// sorted by the cell of a coarse grid over the layout, so the images of any view are a
// few ranges of it: a zoomed-in frame draws only those. Zoomed out, where the images are
// too many to draw every frame (software WebGL spends about 0.5 us on each), a frame
// shows the overview: every image drawn once into a texture, again only when something
// changes.
//
// Thumbnails come in two levels of detail: an icon of every image (icons-NNN.js, all
// loaded at once, one texture layer per atlas) and full-size sprites (atlas-NNN.js),
// loaded for the atlases the view needs once it zooms in far enough, at most FULL_SLOTS
// at a time, so the page's memory stays bounded.
//
// Atlases are scripts that call explorerAtlas(script, base64 JPEG): a page opened from
// disk may not read the pixels of its own image files, but it may run its own scripts.
"use strict";

window.createExplorerRenderer = function (canvas, layout, events) {
  const gl = canvas.getContext("webgl2", { antialias: false, alpha: false });
  if (!gl) return null;

  const FULL_SLOTS = 24; // full-size atlases on the GPU at once (16 MiB each at 2048 px)
  const OVERVIEW_SIDE = 4096; // px of the overview texture (64 MiB)
  let directLimit = 40000; // a view with at most this many images is drawn image by image
  const OVERVIEW_MS = 1000; // while icons arrive, the overview is redrawn at most this often
  const PARALLEL_LOADS = 6; // atlas scripts loading at once
  const BLOB_CACHE = 24; // full-size atlases kept as JPEG bytes, to reload without a script

  const sprite = layout.sprite; // {width, height}
  const atlas = layout.atlas; // {columns, rows, sizes, files, icons, icon: {width, height}}
  const atlasCount = atlas.sizes.length;
  const fullSize = { width: atlas.columns * sprite.width, height: atlas.rows * sprite.height };
  const iconSize = { width: atlas.columns * atlas.icon.width, height: atlas.rows * atlas.icon.height };

  // Each image's atlas and its cell there: atlas k holds the next sizes[k] sprites, and
  // the rows are the sprites in order, less the hidden ones (sprite numbers, ascending:
  // images the atlases still hold but the page's sample has left out).
  const hidden = atlas.hidden || [];
  const count = atlas.sizes.reduce((sum, size) => sum + size, 0) - hidden.length;
  const atlasOf = new Uint16Array(count);
  const cellOf = new Uint32Array(count);
  for (let k = 0, row = 0, sprite = 0, skip = 0; k < atlasCount; k += 1) {
    for (let cell = 0; cell < atlas.sizes[k]; cell += 1, sprite += 1) {
      if (skip < hidden.length && hidden[skip] === sprite) {
        skip += 1;
        continue;
      }
      atlasOf[row] = k;
      cellOf[row] = cell;
      row += 1;
    }
  }

  // ------------------------------------------------------------------ program

  const VERTEX = `#version 300 es
    precision highp float;
    precision highp int;
    layout(location = 1) in vec4 instance;  // world x, y; atlas; cell (the image's 4 corners)
    layout(location = 2) in vec4 style;     // rgb; flags (1 selected, 2 opened)
    uniform vec2 scale, offset;             // world to clip space
    uniform vec2 spriteSize;                // world units
    uniform int columns;
    uniform highp isampler2D slots;         // per atlas, its full-size slot or -1
    out vec2 uv;
    flat out vec3 color;
    flat out int flags;
    flat out vec2 cell;
    flat out float layer;
    flat out float slot;
    void main() {
      int vertex = gl_VertexID & 3; // each image's four vertices are 4k .. 4k + 3
      vec2 corner = vec2(float(vertex & 1), float(vertex >> 1));
      gl_Position = vec4((instance.xy + corner * spriteSize) * scale + offset, 0.0, 1.0);
      uv = corner;
      color = style.rgb;
      flags = int(style.a * 255.0 + 0.5);
      int index = int(instance.w + 0.5);
      cell = vec2(float(index % columns), float(index / columns));
      layer = instance.z;
      slot = float(texelFetch(slots, ivec2(int(instance.z + 0.5), 0), 0).r);
    }`;

  const FRAGMENT = `#version 300 es
    precision highp float;
    precision highp int;
    precision highp sampler2DArray;
    in vec2 uv;
    flat in vec3 color;
    flat in int flags;
    flat in vec2 cell;
    flat in float layer;
    flat in float slot;
    uniform int level;                      // 0 colors, 1 icons, 2 full-size where loaded
    uniform sampler2DArray icons, full;
    uniform vec2 iconCell, fullCell;        // one cell in texture coordinates
    uniform vec2 iconHalfTexel, fullHalfTexel; // half a texel, as a share of a cell
    uniform vec2 frame, outline;            // as a share of the sprite
    out vec4 pixel;
    void main() {
      vec2 edge = min(uv, 1.0 - uv);
      if ((flags & 2) != 0 && (edge.x < 1.5 * outline.x || edge.y < 1.5 * outline.y)) {
        pixel = vec4(1.0);
        return;
      }
      if ((flags & 1) != 0 && (edge.x < outline.x || edge.y < outline.y)) {
        pixel = vec4(1.0, 0.8, 0.2, 1.0);
        return;
      }
      if (level == 0 || edge.x < frame.x || edge.y < frame.y) {
        pixel = vec4(color, 1.0);
        return;
      }
      vec2 inner = (uv - frame) / (1.0 - 2.0 * frame);
      if (level == 2 && slot >= 0.0) {
        vec2 at = cell + clamp(inner, fullHalfTexel, 1.0 - fullHalfTexel);
        pixel = texture(full, vec3(at * fullCell, slot));
      } else {
        vec2 at = cell + clamp(inner, iconHalfTexel, 1.0 - iconHalfTexel);
        pixel = texture(icons, vec3(at * iconCell, layer));
      }
    }`;

  function compile(type, source) {
    const shader = gl.createShader(type);
    gl.shaderSource(shader, source);
    gl.compileShader(shader);
    if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(shader));
    return shader;
  }

  const program = gl.createProgram();
  gl.attachShader(program, compile(gl.VERTEX_SHADER, VERTEX));
  gl.attachShader(program, compile(gl.FRAGMENT_SHADER, FRAGMENT));
  gl.linkProgram(program);
  if (!gl.getProgramParameter(program, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(program));
  gl.useProgram(program);
  const uniform = {};
  for (const name of ["scale", "offset", "spriteSize", "columns", "slots", "level", "icons", "full",
    "iconCell", "fullCell", "iconHalfTexel", "fullHalfTexel", "frame", "outline"]) {
    uniform[name] = gl.getUniformLocation(program, name);
  }

  // Four vertices an image (the same values at each: the shader finds its corner from
  // gl_VertexID) and two triangles of indices, which never change.
  const vertexArray = gl.createVertexArray();
  gl.bindVertexArray(vertexArray);
  const instanceBuffer = gl.createBuffer();
  gl.bindBuffer(gl.ARRAY_BUFFER, instanceBuffer);
  gl.enableVertexAttribArray(1);
  gl.vertexAttribPointer(1, 4, gl.FLOAT, false, 0, 0);
  const styleBuffer = gl.createBuffer();
  gl.bindBuffer(gl.ARRAY_BUFFER, styleBuffer);
  gl.enableVertexAttribArray(2);
  gl.vertexAttribPointer(2, 4, gl.UNSIGNED_BYTE, true, 0, 0);
  const indices = new Uint32Array(Math.max(1, count) * 6);
  for (let k = 0; k < count; k += 1) {
    const first = 4 * k;
    indices.set([first, first + 1, first + 2, first + 2, first + 1, first + 3], 6 * k);
  }
  const indexBuffer = gl.createBuffer();
  gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, indexBuffer);
  gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, indices, gl.STATIC_DRAW);
  gl.bindVertexArray(null);

  // The overview: a texture of every image, and a program that shows it as one quad.
  const overviewProgram = gl.createProgram();
  gl.attachShader(overviewProgram, compile(gl.VERTEX_SHADER, `#version 300 es
    uniform vec4 area; // the texture's place in clip space: left, top, right, bottom
    out vec2 uv;
    void main() {
      vec2 corner = vec2(float(gl_VertexID & 1), float(gl_VertexID >> 1));
      uv = vec2(corner.x, 1.0 - corner.y);
      gl_Position = vec4(mix(area.xy, area.zw, corner), 0.0, 1.0);
    }`));
  gl.attachShader(overviewProgram, compile(gl.FRAGMENT_SHADER, `#version 300 es
    precision highp float;
    uniform sampler2D picture;
    in vec2 uv;
    out vec4 pixel;
    void main() { pixel = texture(picture, uv); }`));
  gl.linkProgram(overviewProgram);
  if (!gl.getProgramParameter(overviewProgram, gl.LINK_STATUS)) {
    throw new Error(gl.getProgramInfoLog(overviewProgram));
  }
  const overviewArea = gl.getUniformLocation(overviewProgram, "area");
  const overviewPicture = gl.getUniformLocation(overviewProgram, "picture");
  let overviewTexture = null, overviewFramebuffer = null; // made when first needed

  function makeOverview() {
    gl.activeTexture(gl.TEXTURE3);
    overviewTexture = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, overviewTexture);
    const levels = Math.floor(Math.log2(OVERVIEW_SIDE)) + 1;
    gl.texStorage2D(gl.TEXTURE_2D, levels, gl.RGBA8, OVERVIEW_SIDE, OVERVIEW_SIDE);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.LINEAR_MIPMAP_LINEAR);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.LINEAR);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
    overviewFramebuffer = gl.createFramebuffer();
    gl.bindFramebuffer(gl.FRAMEBUFFER, overviewFramebuffer);
    gl.framebufferTexture2D(gl.FRAMEBUFFER, gl.COLOR_ATTACHMENT0, gl.TEXTURE_2D, overviewTexture, 0);
    gl.bindFramebuffer(gl.FRAMEBUFFER, null);
  }

  // ------------------------------------------------------------------ textures

  function arrayTexture(unit, width, height, layers) {
    const texture = gl.createTexture();
    gl.activeTexture(gl.TEXTURE0 + unit);
    gl.bindTexture(gl.TEXTURE_2D_ARRAY, texture);
    gl.texStorage3D(gl.TEXTURE_2D_ARRAY, 1, gl.RGBA8, width, height, layers);
    gl.texParameteri(gl.TEXTURE_2D_ARRAY, gl.TEXTURE_MIN_FILTER, gl.LINEAR);
    gl.texParameteri(gl.TEXTURE_2D_ARRAY, gl.TEXTURE_MAG_FILTER, gl.LINEAR);
    gl.texParameteri(gl.TEXTURE_2D_ARRAY, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
    gl.texParameteri(gl.TEXTURE_2D_ARRAY, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
    return texture;
  }

  const layerLimit = gl.getParameter(gl.MAX_ARRAY_TEXTURE_LAYERS);
  if (atlasCount > layerLimit) {
    throw new Error(atlasCount + " atlases, more than this GPU's " + layerLimit + " texture layers");
  }
  const iconTexture = arrayTexture(0, iconSize.width, iconSize.height, Math.max(1, atlasCount));
  const fullSlots = Math.max(1, Math.min(FULL_SLOTS, atlasCount));
  const fullTexture = arrayTexture(1, fullSize.width, fullSize.height, fullSlots);
  // Per atlas, the slot holding its full-size sprites (-1: none), read by the shader.
  const slotOf = new Int16Array(Math.max(1, atlasCount)).fill(-1);
  gl.activeTexture(gl.TEXTURE2);
  const slotTexture = gl.createTexture();
  gl.bindTexture(gl.TEXTURE_2D, slotTexture);
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.NEAREST);
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.NEAREST);
  gl.pixelStorei(gl.UNPACK_ALIGNMENT, 1);
  gl.texImage2D(gl.TEXTURE_2D, 0, gl.R16I, slotOf.length, 1, 0, gl.RED_INTEGER, gl.SHORT, slotOf);

  function uploadSlots() {
    gl.activeTexture(gl.TEXTURE2);
    gl.bindTexture(gl.TEXTURE_2D, slotTexture);
    gl.texSubImage2D(gl.TEXTURE_2D, 0, 0, 0, slotOf.length, 1, gl.RED_INTEGER, gl.SHORT, slotOf);
  }

  gl.uniform1i(uniform.icons, 0);
  gl.uniform1i(uniform.full, 1);
  gl.uniform1i(uniform.slots, 2);
  gl.uniform1i(uniform.columns, atlas.columns);
  gl.uniform2f(uniform.spriteSize, sprite.width, sprite.height);
  gl.uniform2f(uniform.iconCell, atlas.icon.width / iconSize.width, atlas.icon.height / iconSize.height);
  gl.uniform2f(uniform.fullCell, sprite.width / fullSize.width, sprite.height / fullSize.height);
  gl.uniform2f(uniform.iconHalfTexel, 0.5 / atlas.icon.width, 0.5 / atlas.icon.height);
  gl.uniform2f(uniform.fullHalfTexel, 0.5 / sprite.width, 0.5 / sprite.height);

  function upload(texture, unit, layer, bitmap) {
    gl.activeTexture(gl.TEXTURE0 + unit);
    gl.bindTexture(gl.TEXTURE_2D_ARRAY, texture);
    gl.texSubImage3D(gl.TEXTURE_2D_ARRAY, 0, 0, 0, layer, bitmap.width, bitmap.height, 1,
      gl.RGBA, gl.UNSIGNED_BYTE, bitmap);
    bitmap.close();
  }

  // ------------------------------------------------------------------ atlas scripts

  const BASE64 = new Uint8Array(128);
  "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    .split("").forEach((char, value) => { BASE64[char.charCodeAt(0)] = value; });

  function fromBase64(text) {
    if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
    const padding = text.endsWith("==") ? 2 : text.endsWith("=") ? 1 : 0;
    const bytes = new Uint8Array((text.length / 4) * 3 - padding);
    for (let i = 0, j = 0; i < text.length; i += 4) {
      const n = (BASE64[text.charCodeAt(i)] << 18) | (BASE64[text.charCodeAt(i + 1)] << 12) |
        (BASE64[text.charCodeAt(i + 2)] << 6) | BASE64[text.charCodeAt(i + 3)];
      if (j < bytes.length) bytes[j++] = n >> 16;
      if (j < bytes.length) bytes[j++] = (n >> 8) & 255;
      if (j < bytes.length) bytes[j++] = n & 255;
    }
    return bytes;
  }

  const waiting = new Map(); // script element: {resolve, reject}
  window.explorerAtlas = (script, text) => {
    const entry = waiting.get(script);
    if (!entry) return;
    waiting.delete(script);
    try {
      entry.resolve(new Blob([fromBase64(text)], { type: "image/jpeg" }));
    } catch (error) {
      entry.reject(error);
    }
  };

  function loadScript(file) {
    // The JPEG bytes an atlas script carries, as a Blob.
    return new Promise((resolve, reject) => {
      const script = document.createElement("script");
      waiting.set(script, { resolve, reject });
      script.onload = () => {
        script.remove();
        if (waiting.delete(script)) reject(new Error(file + " did not hand over an atlas"));
      };
      script.onerror = () => {
        script.remove();
        waiting.delete(script);
        reject(new Error("could not load " + file));
      };
      script.src = file;
      document.head.append(script);
    });
  }

  const queue = []; // {file, done}: scripts to load, PARALLEL_LOADS at a time
  let loading = 0;
  function enqueue(file, first) {
    return new Promise((resolve, reject) => {
      const task = { file, resolve, reject };
      if (first) queue.unshift(task);
      else queue.push(task);
      pump();
    });
  }
  function pump() {
    while (loading < PARALLEL_LOADS && queue.length) {
      const task = queue.shift();
      loading += 1;
      loadScript(task.file).then(task.resolve, task.reject).finally(() => {
        loading -= 1;
        pump();
      });
    }
  }

  let iconsLoaded = 0, iconsLoadedAt = null, failed = false;
  atlas.icons.forEach((file, k) => {
    enqueue(file, false)
      .then((blob) => createImageBitmap(blob))
      .then((bitmap) => {
        upload(iconTexture, 0, k, bitmap);
        iconsLoaded += 1;
        if (iconsLoaded === atlasCount) iconsLoadedAt = performance.now();
        events.changed();
      })
      .catch((error) => {
        failed = true;
        events.failed(file + ": " + error.message + "; run `dvc repro explore`.");
      });
  });

  // Full-size atlases: which are on the GPU, which are on their way, and recent JPEGs.
  const slotAtlas = new Int32Array(fullSlots).fill(-1); // per slot, its atlas
  const slotUsed = new Float64Array(fullSlots); // when each slot was last wanted
  const loadingInto = new Map(); // slot: the atlas on its way into it
  const blobs = new Map(); // atlas: JPEG Blob, most recent last

  function fetchFull(k) {
    if (blobs.has(k)) {
      const blob = blobs.get(k);
      blobs.delete(k);
      blobs.set(k, blob);
      return Promise.resolve(blob);
    }
    return enqueue(atlas.files[k], true).then((blob) => {
      blobs.set(k, blob);
      if (blobs.size > BLOB_CACHE) blobs.delete(blobs.keys().next().value);
      return blob;
    });
  }

  function wantFull(wanted) {
    // `wanted`: the atlases the view needs, most needed first. The first FULL_SLOTS stay
    // or come; a newcomer takes the slot least recently wanted among those not needed.
    const now = performance.now();
    const chosen = wanted.slice(0, fullSlots);
    const keep = new Set(chosen);
    const onTheWay = new Set(loadingInto.values());
    for (const k of chosen) if (slotOf[k] >= 0) slotUsed[slotOf[k]] = now;
    for (const k of chosen) {
      if (slotOf[k] >= 0 || onTheWay.has(k)) continue;
      let slot = -1;
      for (let s = 0; s < fullSlots; s += 1) {
        if (loadingInto.has(s) || (slotAtlas[s] >= 0 && keep.has(slotAtlas[s]))) continue;
        if (slot < 0 || slotUsed[s] < slotUsed[slot]) slot = s;
      }
      if (slot < 0) break;
      if (slotAtlas[slot] >= 0) {
        slotOf[slotAtlas[slot]] = -1;
        slotAtlas[slot] = -1;
        uploadSlots();
      }
      slotUsed[slot] = now;
      loadingInto.set(slot, k);
      onTheWay.add(k);
      fetchFull(k)
        .then((blob) => createImageBitmap(blob))
        .then((bitmap) => {
          upload(fullTexture, 1, slot, bitmap);
          slotAtlas[slot] = k;
          slotOf[k] = slot;
          uploadSlots();
          events.changed();
        })
        .catch((error) => events.failed(atlas.files[k] + ": " + error.message + "; run `dvc repro explore`."))
        .finally(() => loadingInto.delete(slot));
    }
  }

  // ------------------------------------------------------------------ drawing

  // The images in drawing order, sorted by cell of a grid x grid layout of the world:
  // cellStart[c] .. cellStart[c + 1] are cell c's positions in that order (row-major).
  let order = new Int32Array(0);
  let grid = 1, cellStart = new Uint32Array(2);
  let world = { left: 0, top: 0, right: 1, bottom: 1 };
  let overviewStale = true, overviewDrawnAt = 0, overviewLevel = -1;

  function setInstances(images, worldX, worldY, bounds) {
    // The images to draw (in the page's drawing order) at their world positions, inside
    // `bounds`. Returns the order they are drawn in: by grid cell, then as given.
    world = bounds;
    grid = Math.max(1, Math.min(256, Math.ceil(Math.sqrt(images.length / 32))));
    const cellWidth = (world.right - world.left) / grid || 1;
    const cellHeight = (world.bottom - world.top) / grid || 1;
    const cellOfImage = new Uint32Array(images.length);
    cellStart = new Uint32Array(grid * grid + 1);
    for (let k = 0; k < images.length; k += 1) {
      const i = images[k];
      const column = Math.min(grid - 1, Math.max(0, Math.floor((worldX[i] - world.left) / cellWidth)));
      const row = Math.min(grid - 1, Math.max(0, Math.floor((worldY[i] - world.top) / cellHeight)));
      cellOfImage[k] = row * grid + column;
      cellStart[cellOfImage[k] + 1] += 1;
    }
    for (let c = 0; c < grid * grid; c += 1) cellStart[c + 1] += cellStart[c];
    order = new Int32Array(images.length);
    const next = cellStart.slice(0, grid * grid);
    for (let k = 0; k < images.length; k += 1) order[next[cellOfImage[k]]++] = images[k];
    const values = new Float32Array(order.length * 16);
    for (let k = 0; k < order.length; k += 1) {
      const i = order[k];
      for (let corner = 0; corner < 4; corner += 1) {
        const at = 16 * k + 4 * corner;
        values[at] = worldX[i];
        values[at + 1] = worldY[i];
        values[at + 2] = atlasOf[i];
        values[at + 3] = cellOf[i];
      }
    }
    gl.bindBuffer(gl.ARRAY_BUFFER, instanceBuffer);
    gl.bufferData(gl.ARRAY_BUFFER, values, gl.STATIC_DRAW);
    overviewStale = true;
    return order;
  }

  function setStyles(colorOf, selected, opened) {
    // Per drawn image: colorOf(i) gives [r, g, b], selected(i) its lasso selection;
    // `opened` is the image whose details are open.
    const values = new Uint8Array(order.length * 16);
    for (let k = 0; k < order.length; k += 1) {
      const i = order[k];
      const rgb = colorOf(i);
      const flags = (selected(i) ? 1 : 0) | (i === opened ? 2 : 0);
      for (let corner = 0; corner < 4; corner += 1) {
        const at = 16 * k + 4 * corner;
        values[at] = rgb[0];
        values[at + 1] = rgb[1];
        values[at + 2] = rgb[2];
        values[at + 3] = flags;
      }
    }
    gl.bindBuffer(gl.ARRAY_BUFFER, styleBuffer);
    gl.bufferData(gl.ARRAY_BUFFER, values, gl.DYNAMIC_DRAW);
    overviewStale = true;
  }

  function rangesIn(rect) {
    // The [first, end) positions in drawing order of the grid cells that meet `rect`
    // (world units), one range per grid row.
    const cellWidth = (world.right - world.left) / grid || 1;
    const cellHeight = (world.bottom - world.top) / grid || 1;
    const clamp = (value) => Math.min(grid - 1, Math.max(0, value));
    const left = clamp(Math.floor((rect.left - world.left) / cellWidth));
    const right = clamp(Math.floor((rect.right - world.left) / cellWidth));
    const top = clamp(Math.floor((rect.top - world.top) / cellHeight));
    const bottom = clamp(Math.floor((rect.bottom - world.top) / cellHeight));
    const ranges = [];
    if (rect.right < world.left || rect.left > world.right) return ranges;
    if (rect.bottom < world.top || rect.top > world.bottom) return ranges;
    for (let row = top; row <= bottom; row += 1) {
      const first = cellStart[row * grid + left], end = cellStart[row * grid + right + 1];
      if (end > first) ranges.push([first, end]);
    }
    return ranges;
  }

  function imagesIn(rect) {
    // The images whose cells meet `rect`, in drawing order (a superset of those in it).
    const found = [];
    for (const [first, end] of rangesIn(rect)) for (let k = first; k < end; k += 1) found.push(order[k]);
    return found;
  }

  function useImageProgram(scaleX, scaleY, offsetX, offsetY, level, spriteOnScreen) {
    gl.useProgram(program);
    gl.bindVertexArray(vertexArray);
    gl.uniform2f(uniform.scale, scaleX, scaleY);
    gl.uniform2f(uniform.offset, offsetX, offsetY);
    gl.uniform1i(uniform.level, level);
    const frame = Math.max(0.06, 1 / spriteOnScreen);
    gl.uniform2f(uniform.frame, frame, (frame * sprite.width) / sprite.height);
    const outline = Math.min(0.25, 2 / spriteOnScreen);
    gl.uniform2f(uniform.outline, outline, (outline * sprite.width) / sprite.height);
  }

  function drawRanges(ranges) {
    for (const [first, end] of ranges) {
      gl.drawElements(gl.TRIANGLES, (end - first) * 6, gl.UNSIGNED_INT, first * 6 * 4);
    }
  }

  function overviewSpan() {
    // The world square the overview texture covers, from the world's top left corner.
    return Math.max(world.right - world.left, world.bottom - world.top, 1);
  }

  function renderOverview(iconsLevel) {
    // Every image, drawn once into the overview texture, with its mipmaps.
    if (!overviewTexture) makeOverview();
    const span = overviewSpan();
    const spriteOnTexture = (sprite.width * OVERVIEW_SIDE) / span;
    const level = spriteOnTexture < 4 ? 0 : iconsLevel;
    gl.bindFramebuffer(gl.FRAMEBUFFER, overviewFramebuffer);
    gl.viewport(0, 0, OVERVIEW_SIDE, OVERVIEW_SIDE);
    gl.clearColor(0.082, 0.09, 0.11, 1);
    gl.clear(gl.COLOR_BUFFER_BIT);
    // Texture rows go upwards in clip space: world top is texture row 0.
    const scale = 2 / span;
    useImageProgram(scale, scale, -1 - world.left * scale, -1 - world.top * scale, level, spriteOnTexture);
    gl.drawElements(gl.TRIANGLES, order.length * 6, gl.UNSIGNED_INT, 0);
    gl.bindFramebuffer(gl.FRAMEBUFFER, null);
    gl.activeTexture(gl.TEXTURE3);
    gl.bindTexture(gl.TEXTURE_2D, overviewTexture);
    gl.generateMipmap(gl.TEXTURE_2D);
    overviewStale = false;
    overviewDrawnAt = performance.now();
    overviewLevel = iconsLevel;
  }

  function draw(view, width, height, ratio, level) {
    // view: screen = world * scale + (x, y), CSS px; level 0, 1 or 2 (see the shader).
    // Returns how the frame was drawn: "images" (count) or "overview".
    const deviceWidth = Math.max(1, Math.round(width * ratio));
    const deviceHeight = Math.max(1, Math.round(height * ratio));
    if (canvas.width !== deviceWidth || canvas.height !== deviceHeight) {
      canvas.width = deviceWidth; // resizing reallocates the drawing buffer: only on change
      canvas.height = deviceHeight;
    }
    const rect = {
      left: -view.x / view.scale - sprite.width, right: (width - view.x) / view.scale,
      top: -view.y / view.scale - sprite.height, bottom: (height - view.y) / view.scale,
    };
    const ranges = rangesIn(rect);
    const inView = ranges.reduce((sum, [first, end]) => sum + end - first, 0);
    // The overview serves while one of its texels covers at most 1.5 device px.
    const texel = (overviewSpan() / OVERVIEW_SIDE) * view.scale * ratio;
    const useOverview = inView > directLimit && texel <= 1.5;
    if (useOverview) {
      const iconsLevel = iconsLoaded > 0 ? 1 : 0;
      const late = performance.now() - overviewDrawnAt > OVERVIEW_MS;
      if (overviewStale && (late || iconsLoaded === atlasCount) || overviewLevel !== iconsLevel) {
        renderOverview(iconsLevel);
      }
    }
    gl.viewport(0, 0, deviceWidth, deviceHeight);
    gl.clearColor(0.082, 0.09, 0.11, 1);
    gl.clear(gl.COLOR_BUFFER_BIT);
    if (useOverview) {
      const span = overviewSpan();
      const toClipX = (x) => ((x * view.scale + view.x) / width) * 2 - 1;
      const toClipY = (y) => 1 - ((y * view.scale + view.y) / height) * 2;
      gl.useProgram(overviewProgram);
      gl.bindVertexArray(null);
      gl.uniform1i(overviewPicture, 3);
      gl.uniform4f(overviewArea, toClipX(world.left), toClipY(world.top + span),
        toClipX(world.left + span), toClipY(world.top));
      gl.drawArrays(gl.TRIANGLE_STRIP, 0, 4);
      return "overview";
    }
    useImageProgram((2 * view.scale) / width, (-2 * view.scale) / height,
      (2 * view.x) / width - 1, 1 - (2 * view.y) / height, level, sprite.width * view.scale * ratio);
    drawRanges(ranges);
    return "images " + inView;
  }

  canvas.addEventListener("webglcontextlost", (event) => {
    event.preventDefault();
    events.failed("The GPU dropped this page's drawing (WebGL context lost): reload the page.");
  });

  return {
    setInstances,
    setStyles,
    draw,
    imagesIn,
    setDirectLimit(limit) {
      // For tests: use the overview whenever more than `limit` images are in view.
      directLimit = limit;
    },
    wantFull,
    atlasOf: (i) => atlasOf[i],
    sync() {
      // Waits until the GPU has drawn everything asked of it (reading a pixel must).
      gl.readPixels(0, 0, 1, 1, gl.RGBA, gl.UNSIGNED_BYTE, new Uint8Array(4));
    },
    iconsLoaded: () => iconsLoaded === atlasCount && !failed,
    iconsLoadedAt: () => iconsLoadedAt,
    residentAtlases: () => Array.from(slotAtlas).filter((k) => k >= 0).sort((a, b) => a - b),
    iconSize: atlas.icon,
  };
};
