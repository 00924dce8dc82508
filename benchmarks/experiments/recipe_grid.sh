#!/usr/bin/env bash
# Short recipe comparisons on a 10,000-image subset at 64 px, judged on 2,000 val images
# (the test split is not looked at for choices). Usage: recipe_grid.sh NAME "OPTIONS" [NAME "OPTIONS" ...]
set -u
out=runs/recipe
mkdir -p $out
while [ $# -ge 2 ]; do
  name=$1; opts=$2; shift 2
  rm -rf $out/$name
  { echo "== $name: $opts"; uptime; } >> $out/grid.log
  start=$(date +%s)
  nice -n 5 .venv/bin/fmtl train --max-train-samples 10000 --max-eval-samples 2000 --quiet --no-save-state \
    --output $out/$name $opts > $out/$name.log 2>&1
  echo "rc $? in $(( $(date +%s) - start ))s; $(grep -E '^epoch' $out/$name.log | tail -3 | tr '\n' ' ')" >> $out/grid.log
  uptime >> $out/grid.log
done
