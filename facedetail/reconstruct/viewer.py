"""``view.html``: one self-contained page that shows a detailed face in 3D (no network, no library).

The mesh is embedded as base64 typed arrays (positions float32, normals int8, UVs uint16, indices uint32)
and the texture as a JPEG data URI; about 60 lines of WebGL2 draw it (drag to turn, wheel to zoom, ``t``
switches between the photo texture and grey shading, which shows the details best). Written by hand rather
than vendoring three.js into every page, because a viewer of one mesh needs only this much.
"""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np
from numpy.typing import NDArray
from PIL import Image

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>html,body{margin:0;height:100%;background:#f2f2f2;font:13px sans-serif}canvas{width:100%;height:100%;
display:block}#info{position:absolute;left:8px;top:6px;color:#333}</style></head>
<body><div id="info">__TITLE__ — drag: turn · wheel: zoom · t: texture/grey</div><canvas id="c"></canvas>
<script id="mesh" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("mesh").textContent);
function bytes(b64) { const s = atob(b64); const a = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i); return a.buffer; }
const canvas = document.getElementById("c");
const gl = canvas.getContext("webgl2", {antialias: true});
if (!gl) { document.getElementById("info").textContent = "This browser has no WebGL2."; throw 0; }
const vs = `#version 300 es
in vec3 p; in vec3 n; in vec2 uv; uniform mat4 M; uniform mat4 P; out vec3 vn; out vec2 vuv;
void main() { vn = mat3(M) * n; vuv = uv; gl_Position = P * M * vec4(p, 1.0); }`;
const fs = `#version 300 es
precision highp float; in vec3 vn; in vec2 vuv; uniform sampler2D tex; uniform int grey; out vec4 o;
void main() { vec3 l = normalize(vec3(-0.5, 0.5, 0.7)); float s = 0.2 + 0.8 * max(dot(normalize(vn), l), 0.0);
  vec3 c = grey == 1 ? vec3(0.8) * s : texture(tex, vuv).rgb * (0.55 + 0.45 * s); o = vec4(c, 1.0); }`;
function shader(type, src) { const s = gl.createShader(type); gl.shaderSource(s, src); gl.compileShader(s);
  if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s)); return s; }
const prog = gl.createProgram();
gl.attachShader(prog, shader(gl.VERTEX_SHADER, vs)); gl.attachShader(prog, shader(gl.FRAGMENT_SHADER, fs));
gl.linkProgram(prog); gl.useProgram(prog);
function attrib(name, data, size, type, norm) { const b = gl.createBuffer(); gl.bindBuffer(gl.ARRAY_BUFFER, b);
  gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW); const loc = gl.getAttribLocation(prog, name);
  gl.enableVertexAttribArray(loc); gl.vertexAttribPointer(loc, size, type, norm, 0, 0); }
const vao = gl.createVertexArray(); gl.bindVertexArray(vao);
attrib("p", new Float32Array(bytes(D.positions)), 3, gl.FLOAT, false);
attrib("n", new Int8Array(bytes(D.normals)), 3, gl.BYTE, true);
attrib("uv", new Uint16Array(bytes(D.uvs)), 2, gl.UNSIGNED_SHORT, true);
const idx = new Uint32Array(bytes(D.indices)); const ib = gl.createBuffer();
gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, ib); gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, idx, gl.STATIC_DRAW);
const tex = gl.createTexture(); gl.bindTexture(gl.TEXTURE_2D, tex);
gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGB, 1, 1, 0, gl.RGB, gl.UNSIGNED_BYTE, new Uint8Array([200, 200, 200]));
let grey = 0; let yaw = 0, pitch = 0, zoom = 2.6, drag = null;
const img = new Image(); img.onload = () => { gl.bindTexture(gl.TEXTURE_2D, tex);
  gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGB, gl.RGB, gl.UNSIGNED_BYTE, img); gl.generateMipmap(gl.TEXTURE_2D);
  draw(); }; img.src = D.texture;
function rot(a, b) { const ca = Math.cos(a), sa = Math.sin(a), cb = Math.cos(b), sb = Math.sin(b);
  return [ca, sa * sb, -sa * cb, 0, 0, cb, sb, 0, sa, -ca * sb, ca * cb, 0, 0, 0, -zoom, 1]; }
function draw() { const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  gl.viewport(0, 0, w, h); gl.clearColor(0.95, 0.95, 0.95, 1); gl.enable(gl.DEPTH_TEST);
  gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT); const f = 1 / Math.tan(0.35), a = w / h, nr = 0.1, fr = 20;
  gl.uniformMatrix4fv(gl.getUniformLocation(prog, "P"), false,
    [f / a, 0, 0, 0, 0, f, 0, 0, 0, 0, (fr + nr) / (nr - fr), -1, 0, 0, 2 * fr * nr / (nr - fr), 0]);
  gl.uniformMatrix4fv(gl.getUniformLocation(prog, "M"), false, rot(yaw, pitch));
  gl.uniform1i(gl.getUniformLocation(prog, "grey"), grey);
  gl.drawElements(gl.TRIANGLES, idx.length, gl.UNSIGNED_INT, 0); }
canvas.onmousedown = e => { drag = [e.clientX, e.clientY]; };
window.onmouseup = () => { drag = null; };
window.onmousemove = e => { if (!drag) return; yaw += (e.clientX - drag[0]) * 0.01;
  pitch = Math.max(-1.5, Math.min(1.5, pitch + (e.clientY - drag[1]) * 0.01)); drag = [e.clientX, e.clientY]; draw(); };
canvas.onwheel = e => { e.preventDefault(); zoom = Math.max(0.8, Math.min(8, zoom * Math.exp(e.deltaY * 0.001)));
  draw(); };
window.onkeydown = e => { if (e.key === "t") { grey = 1 - grey; draw(); } };
window.onresize = draw; draw(); document.title = D.title + " (ready)";
</script></body></html>
"""


def _b64(array: NDArray[np.generic]) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def viewer_html(vertices: NDArray[np.floating], faces: NDArray[np.integer], normals: NDArray[np.floating],
                uv: NDArray[np.floating], texture: NDArray[np.uint8], title: str) -> str:
    """The page for one mesh (model frame, mm: centred and scaled to unit size here; ``uv`` rows top-down)."""
    v = np.asarray(vertices, np.float64)
    lo, hi = v.min(axis=0), v.max(axis=0)
    unit = ((v - (lo + hi) / 2.0) / float((hi - lo).max())).astype("<f4")
    n = np.asarray(normals, np.float64)
    n8 = np.round(n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12) * 127).astype("<i1")
    uv16 = np.round(np.clip(np.asarray(uv, np.float64), 0, 1) * 65535).astype("<u2")
    buf = io.BytesIO()
    Image.fromarray(texture).save(buf, format="JPEG", quality=90)
    data = {"title": title, "positions": _b64(unit), "normals": _b64(n8), "uvs": _b64(uv16),
            "indices": _b64(np.asarray(faces, "<u4")),
            "texture": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")}
    # JSON inside <script>: "</" must not appear (base64 and the title are escaped so it cannot).
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", text)
