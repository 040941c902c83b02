"""Merge per-subject `inbrainsyn evaluate` runs into one table (and paired win counts).

The README's phantom table was produced by 20 single-subject runs in two parallel loops::

    inbrainsyn phantom -o /tmp/phantom_eval --subjects 20 --seed 777 --spacing 2
    for i in $(seq 0 19); do inbrainsyn evaluate --phantom /tmp/phantom_eval -o /tmp/ev/sub$i \
        --subjects 1 --first-subject $i; done
    python benchmarks/merge_evaluation.py benchmarks/evaluation_phantom_2mm.md

Reads /tmp/ev/sub*/metrics.csv (or the folders given by EVAL_GLOB).
"""
import os
import csv, glob, sys
from inbrainsyn.evaluate import summarise, markdown_table
rows=[]
for f in sorted(glob.glob(os.environ.get('EVAL_GLOB', '/tmp/ev/sub*/metrics.csv'))):
    rows+=list(csv.DictReader(open(f)))
for r in rows:
    for k in ('psnr','ssim','mae','dice'): r[k]=float(r[k])
subjects = {r['subject'] for r in rows}
print(len(subjects), 'subjects,', len([r for r in rows if r['method']=='pole']), 'follow-ups')
s = summarise(rows)
print(markdown_table(s))
pole = next(e for e in s if e['method']=='pole')
for e in s:
    if e['method'] in ('untransported','template','copy'):
        print(e['method'], 'pole better on', [m for m in ('psnr','ssim','dice') if pole[m] > e[m]] + (['mae'] if pole['mae'] < e['mae'] else []))
# paired: per follow-up, pole vs untransported
import numpy as np
for other in ('untransported','copy','template','half-conjugation','conjugation'):
    key=lambda r:(r['subject'], r['age'])
    a={key(r):r for r in rows if r['method']=='pole'}; b={key(r):r for r in rows if r['method']==other}
    wins={m: sum((a[k][m] > b[k][m]) if m!='mae' else (a[k][m] < b[k][m]) for k in a if k in b) for m in ('psnr','ssim','mae','dice')}
    print('pole vs', other, 'wins per metric out of', len(a), wins)
if len(sys.argv) > 1:
    open(sys.argv[1],'w').write(markdown_table(s))
