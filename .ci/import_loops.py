#!/usr/bin/env python3
"""Import loops between a Rust crate's modules: exits 1 if there are any.

Usage: import_loops.py SRC_DIR...

Edges come from `use` trees and `crate::`/`super::`/`self::` paths (test modules excluded).
A module using its own parent or child is containment, not an import: each edge is
projected onto the two sibling modules under the pair's lowest common ancestor
(`devices::worker::conversation -> devices::turn` counts as `worker -> turn`), and a loop
is a cycle among siblings (a strongly connected component of more than one module).
"""
import os, re, sys
from collections import defaultdict

def modules(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith('.rs'): continue
            p = os.path.join(root, f)
            rel = os.path.relpath(p, src)[:-3].split(os.sep)
            if rel[-1] in ('mod', 'lib', 'main'): rel = rel[:-1]
            if rel and rel[0] in ('bin',): continue
            mods[tuple(rel)] = p
    return mods

def strip(text):
    text = re.sub(r'//[^\n]*', '', text)
    text = re.sub(r'/\*.*?\*/', '', text, flags=re.S)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    # drop #[cfg(test)] mod tests { ... } blocks (approx: from marker to end of file)
    m = re.search(r'#\[cfg\(test\)\]\s*mod\s+\w+\s*\{', text)
    if m: text = text[:m.start()]
    return text

def paths(text):
    out = []
    # expand use trees
    for m in re.finditer(r'\buse\s+([^;]+);', text):
        out += expand(m.group(1).replace('\n', ' ').replace(' ', ''))
    for m in re.finditer(r'\b((?:crate|super|self)(?:::\w+)+)', text):
        out.append(m.group(1).split('::'))
    return out

def expand(tree, prefix=()):
    res = []
    i = tree.find('{')
    if i < 0:
        return [list(prefix) + [p for p in tree.split('::') if p]]
    head = [p for p in tree[:i].split('::') if p]
    body = tree[i+1:tree.rfind('}')]
    depth, cur, parts = 0, '', []
    for ch in body:
        if ch == ',' and depth == 0: parts.append(cur); cur = ''; continue
        depth += ch == '{'; depth -= ch == '}'; cur += ch
    parts.append(cur)
    for p in parts:
        if p: res += expand(p, tuple(prefix) + tuple(head))
    return res

def resolve(path, here, mods, is_dir):
    base = list(here) if is_dir else list(here[:-1]) if here else []
    cur = list(here)
    segs = list(path)
    if segs[0] == 'crate': cur = []; segs = segs[1:]
    else:
        # module of the file itself
        while segs and segs[0] in ('super', 'self'):
            if segs[0] == 'super': cur = cur[:-1]
            segs = segs[1:]
        if path[0] not in ('super', 'self'):
            cur = list(here)  # child module path
    best = None
    for k in range(len(segs) + 1):
        cand = tuple(cur + segs[:k])
        if cand in mods: best = cand
    return best

def main(src):
    print(f'{src}:')
    mods = modules(src)
    g = defaultdict(set); edges = set()
    for m, p in mods.items():
        text = strip(open(p).read())
        for path in paths(text):
            if not path or path[0] not in ('crate', 'super', 'self') and tuple(list(m) + [path[0]]) not in mods:
                continue
            t = resolve(path, m, mods, True)
            if t is None or t == m: continue
            # project onto the siblings under the lowest common ancestor: a module
            # using its own parent or child is containment, not a loop
            k = 0
            while k < min(len(m), len(t)) and m[k] == t[k]: k += 1
            if k == len(m) or k == len(t): continue
            a, b = m[:k+1], t[:k+1]
            g[a].add(b); edges.add((a, b, m, t))
    # SCCs (Tarjan)
    idx, low, st, on, out, n = {}, {}, [], set(), [], [0]
    def sc(v):
        idx[v] = low[v] = n[0]; n[0] += 1; st.append(v); on.add(v)
        for w in g[v]:
            if w not in idx: sc(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = st.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(comp)
    sys.setrecursionlimit(10000)
    for v in list(g): 
        if v not in idx: sc(v)
    name = lambda m: '::'.join(m) or 'crate'
    for comp in out:
        cs = set(comp)
        print('  loop:', ', '.join(sorted(name(c) for c in comp)))
        for (a, b, m, t) in sorted(edges):
            if a in cs and b in cs:
                print('     ', name(a), '->', name(b), '' if (a, b) == (m, t) else f'({name(m)} -> {name(t)})')
    print(f'  {len(mods)} modules, {len(out)} import loops')
    return len(out)


if __name__ == '__main__':
    loops = sum(main(src) for src in sys.argv[1:])
    sys.exit(1 if loops else 0)
