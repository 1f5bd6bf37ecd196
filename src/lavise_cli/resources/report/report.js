const main = document.getElementById('cards');
const cards = Array.from(main.querySelectorAll('.card'));
const $ = id => document.getElementById(id);
const store = 'lavise-ratings:' + document.body.dataset.key;
function recallOf(c) { return c.dataset.recall === '' ? null : parseFloat(c.dataset.recall); }
function keyOf(c, by) {
  const v = by.startsWith('confidence') ? c.dataset.confidence : c.dataset.recall;
  return v === undefined || v === '' ? null : parseFloat(v);
}
function apply() {
  const by = $('sort').value, word = $('word').value.trim().toLowerCase(), min = $('minrec').value;
  const sorted = cards.slice().sort((a, b) => {
    if (by !== 'filter') {
      const ra = keyOf(a, by), rb = keyOf(b, by);
      if (ra !== rb) {
        if (ra === null) return 1;
        if (rb === null) return -1;
        return by.endsWith('-asc') ? ra - rb : rb - ra;
      }
    }
    return a.dataset.filter - b.dataset.filter;
  });
  let shown = 0;
  for (const c of sorted) {
    const r = recallOf(c);
    const hide = (word && !c.dataset.words.split('|').some(w => w.includes(word))) ||
                 (min !== '' && (r === null || r < parseFloat(min)));
    c.hidden = hide;
    if (!hide) shown++;
    main.appendChild(c);
  }
  $('count').textContent = shown + ' of ' + cards.length + ' filters';
}
function ratings() {
  const out = [];
  for (const c of cards) {
    const r = c.querySelector('.rate input:checked');
    if (r) out.push({filter: +c.dataset.filter, rating: r.value, words: c.dataset.words.split('|').filter(Boolean)});
  }
  return out.sort((a, b) => a.filter - b.filter);
}
function ratingsCSV() {
  const q = s => /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  return 'filter,rating,words\n' + ratings().map(r => [r.filter, r.rating, q(r.words.join('; '))].join(',') + '\n').join('');
}
function downloadCSV() {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([ratingsCSV()], {type: 'text/csv'}));
  a.download = 'ratings-' + document.body.dataset.key.replace(/[^\w.-]+/g, '_') + '.csv';
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}
main.addEventListener('change', e => {
  if (!e.target.matches('.rate input')) return;
  e.target.closest('.card').classList.add('rated');
  const saved = {};
  for (const r of ratings()) saved[r.filter] = r.rating;
  try { localStorage.setItem(store, JSON.stringify(saved)); } catch (err) {}
});
try {
  const saved = JSON.parse(localStorage.getItem(store) || '{}');
  for (const c of cards) {
    const v = saved[c.dataset.filter], i = v && c.querySelector('.rate input[value="' + v + '"]');
    if (i) { i.checked = true; c.classList.add('rated'); }
  }
} catch (err) {}
for (const id of ['sort', 'word', 'minrec']) $(id).addEventListener('input', apply);
$('evalmode').addEventListener('change', e => document.body.classList.toggle('eval', e.target.checked));
$('export').addEventListener('click', downloadCSV);
apply();

// -- region overlays ----------------------------------------------------------------------------
// Each thumbnail (.t) carries its filter's region as data-m: base64 run lengths of a thumb x thumb
// mask, row-major, alternating outside/inside, first run outside, each an unsigned LEB128 varint
// (lavise_cli.visualize.drawing.encode_mask). A canvas over the image dims the outside and draws
// the region's inner boundary, data-outline pixels wide (the image border is no boundary), as
// lavise_cli.visualize.drawing.highlight does. Overlays are drawn for the cards near the screen
// and dropped when they scroll far away, so a layer of thousands of filters stays light.
const THUMB = +document.body.dataset.thumb, OUTLINE_W = +document.body.dataset.outline;
const DIM_ALPHA = Math.round(255 * (1 - parseFloat(document.body.dataset.dim)));
const OUTLINE_RGB = document.body.dataset.color.split(',').map(Number);
function decodeMask(b64, n) {
  const s = atob(b64), m = new Uint8Array(n);
  let pos = 0, inside = false, v = 0, shift = 0;
  for (let i = 0; i < s.length; i++) {
    const b = s.charCodeAt(i);
    v += (b & 127) * 2 ** shift;
    shift += 7;
    if (b & 128) continue;
    if (inside) m.fill(1, pos, pos + v);
    pos += v; inside = !inside; v = 0; shift = 0;
  }
  if (pos !== n) throw new Error('region data of ' + pos + ' pixels, not ' + n);
  return m;
}
function nearOutside(m, w, r) {  // 1 where an outside pixel lies within r (a square window)
  const h = new Uint8Array(w * w), out = new Uint8Array(w * w);
  for (let y = 0; y < w; y++) {
    for (let x = 0; x < w; x++) {
      let any = 0;
      for (let k = Math.max(0, x - r); k <= Math.min(w - 1, x + r) && !any; k++) any = !m[y * w + k];
      h[y * w + x] = any;
    }
  }
  for (let y = 0; y < w; y++) {
    for (let x = 0; x < w; x++) {
      let any = 0;
      for (let k = Math.max(0, y - r); k <= Math.min(w - 1, y + r) && !any; k++) any = h[k * w + x];
      out[y * w + x] = any;
    }
  }
  return out;
}
function drawOverlay(t) {
  if (t.querySelector('canvas') || !t.dataset.m) return;
  const n = THUMB * THUMB, m = decodeMask(t.dataset.m, n);
  const edge = OUTLINE_W > 0 ? nearOutside(m, THUMB, OUTLINE_W) : new Uint8Array(n);
  const c = document.createElement('canvas');
  c.className = 'ov'; c.width = THUMB; c.height = THUMB;
  const ctx = c.getContext('2d'), im = ctx.createImageData(THUMB, THUMB), px = im.data;
  for (let i = 0; i < n; i++) {
    if (!m[i]) px[4 * i + 3] = DIM_ALPHA;  // outside: black at 1 - DIM over the image
    else if (edge[i]) {
      px[4 * i] = OUTLINE_RGB[0]; px[4 * i + 1] = OUTLINE_RGB[1]; px[4 * i + 2] = OUTLINE_RGB[2]; px[4 * i + 3] = 255;
    }
  }
  ctx.putImageData(im, 0, 0);
  t.appendChild(c);
}
const overlays = new IntersectionObserver(entries => {
  for (const en of entries) {
    for (const t of en.target.querySelectorAll('.t')) {
      if (en.isIntersecting) drawOverlay(t);
      else for (const c of t.querySelectorAll('canvas')) c.remove();
    }
  }
}, {rootMargin: '1500px 0px'});
for (const c of cards) overlays.observe(c);
