#!/usr/bin/env bash
# Download the published Pythia-70m-deduped dictionaries (sparse autoencoders) and check them.
# `./pretrained_dictionary_downloader.sh --help` lists the options, the sources and the assumptions.
set -euo pipefail

MODEL="pythia-70m-deduped"
ACTIVATION_DIM=512  # d_model of Pythia-70m
N_LAYERS=6
HF_BASE_URL="${DL_HF_BASE_URL:-https://huggingface.co/saprmarks/pythia-70m-deduped-saes/resolve/main}"
TREE_BASE_URL="${DL_TREE_BASE_URL:-https://baulab.us/u/smarks/autoencoders}"
ATTEMPTS="${DL_ATTEMPTS:-3}"
PROG="$(basename "$0")"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<EOF
Usage: $PROG [options]

Download the published dictionaries for EleutherAI's $MODEL into
  DIR/$MODEL/<site>/<set>/{ae.pt, config.json[, checkpoints/ae_STEP.pt]}
where <site> is embed, attn_out_layerN, mlp_out_layerN or resid_out_layerN (N = 0..$((N_LAYERS - 1))),
then check that every ae.pt loads as an AutoEncoder state_dict and print a table of what is on disk.

  $PROG                          # all 19 submodules of set 10_32768 (~2.5 GB)
  $PROG --layers "embed,2"       # embed + attn/mlp/resid of layer 2
  $PROG --checkpoints            # also the training checkpoints (~10 GB per submodule)
  $PROG --set 0_8192 --layers 0,1,2,3,4,5 --kinds mlp   # an older MLP-only set

Options:
  --layers LIST        comma-separated: embed, layer numbers 0..$((N_LAYERS - 1)), or site names such as
                       mlp_out_layer1 (default: embed,0,1,2,3,4,5)
  --kinds LIST         which submodules of a numbered layer: attn,mlp,resid (default: all three)
  --set NAME           dictionary set, <id>_<latents> (default: 10_32768)
  --source SRC         hf: the zip on the Hugging Face Hub; tree: one file at a time from the
                       per-file tree; auto (default): hf for the full 10_32768 set, tree otherwise
                       (a subset then costs its own size, not the whole 2.5 GB zip)
  --checkpoints        also download checkpoints/ae_STEP.pt (always from the tree)
  --steps LIST         checkpoint steps to fetch, e.g. 0,1000 (implies --checkpoints; default: the
                       steps in the tree's directory listing)
  --dir PATH           target folder (default: dictionaries)
  --python PATH        interpreter (with torch) used to check the files (default: \$PYTHON, then
                       python3, then python)
  --expect-shape D,F   expected activation dim and number of latents of every dictionary, or 'any'
                       to check only key names and their mutual consistency
                       (default: $ACTIVATION_DIM,<latents from the set name>)
  --no-verify          skip the check (the table then shows sizes only)
  --keep-zip           keep the downloaded zip (by default it is deleted once unpacked)
  -h, --help           show this help

Environment:
  DL_HF_BASE_URL       base URL of the zip (default: $HF_BASE_URL)
  DL_TREE_BASE_URL     base URL of the per-file tree (default: $TREE_BASE_URL)
                       Point these at a mirror for air-gapped clusters.
  DL_DOWNLOADER        curl or wget (default: curl if installed, else wget)
  DL_ATTEMPTS          attempts per file; an interrupted transfer resumes where it stopped (default: 3)
  PYTHON               interpreter for the check (see --python)

Downloads go to FILE.part and are renamed to FILE only when complete; an existing FILE is taken as
complete and skipped, and a FILE.part left by an interrupted run is resumed.

Layout of the sources (assumptions):
  * tree: <DL_TREE_BASE_URL>/$MODEL/<site>/<set>/{ae.pt,config.json,checkpoints/ae_STEP.pt}.
    The checkpoint steps are read from the server's HTML listing of <site>/<set>/checkpoints/
    (baulab.us serves directory listings); for a mirror without listings pass --steps.
  * hf: <DL_HF_BASE_URL>/dictionaries_${MODEL}_<id>.zip, <id> being the part of the set name
    before '_' (only id 10 is published). Entries are found by their path suffix
    $MODEL/<site>/<set>/{ae.pt,config.json}, whatever folder they sit under (unzipped by hand
    they land in dictionaries/$MODEL/...). The zip holds no checkpoints.
EOF
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }

log() { printf '%s\n' "$*"; }

file_size() {  # bytes in $1, 0 if it does not exist
  if [[ -f $1 ]]; then echo $(($(wc -c <"$1"))); else echo 0; fi
}

human_size() {
  awk -v b="$1" 'BEGIN {
    split("B KiB MiB GiB TiB", unit, " "); i = 1
    while (b >= 1024 && i < 5) { b /= 1024; i++ }
    fmt = (i == 1 ? "%d %s" : "%.1f %s")
    printf fmt, b, unit[i]
  }'
}

# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
layers_arg="embed,0,1,2,3,4,5"
kinds_arg="attn,mlp,resid"
set_name="10_32768"
source_arg="auto"
want_checkpoints=0
steps_arg=""
target_dir="dictionaries"
python_arg=""
expect_shape=""
verify=1
keep_zip=0

while (($#)); do
  if [[ $1 == --*=* ]]; then  # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
  fi
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --checkpoints) want_checkpoints=1 ;;
    --no-verify) verify=0 ;;
    --keep-zip) keep_zip=1 ;;
    --layers | --kinds | --set | --source | --steps | --dir | --python | --expect-shape)
      [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "option $1 needs a value (see --help)"
      case $1 in
        --layers) layers_arg=$2 ;;
        --kinds) kinds_arg=$2 ;;
        --set) set_name=$2 ;;
        --source) source_arg=$2 ;;
        --steps) steps_arg=$2 want_checkpoints=1 ;;
        --dir) target_dir=$2 ;;
        --python) python_arg=$2 ;;
        --expect-shape) expect_shape=$2 ;;
      esac
      shift
      ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

[[ $set_name =~ ^[A-Za-z0-9.-]+_[A-Za-z0-9.-]+$ ]] \
  || die "--set '$set_name' is not a set name like 10_32768 or 0_8192 (<id>_<latents>)"
[[ $ATTEMPTS =~ ^[1-9][0-9]*$ ]] || die "DL_ATTEMPTS='$ATTEMPTS' must be a positive integer"
if [[ -n $steps_arg && ! $steps_arg =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  die "--steps '$steps_arg' must be comma-separated step numbers, e.g. 0,1000,2000"
fi
if [[ -z $expect_shape ]]; then
  if [[ ${set_name##*_} =~ ^[0-9]+$ ]]; then
    expect_shape="$ACTIVATION_DIM,${set_name##*_}"
  else
    expect_shape="any"
  fi
fi
[[ $expect_shape == any || $expect_shape =~ ^[1-9][0-9]*,[1-9][0-9]*$ ]] \
  || die "--expect-shape '$expect_shape' must be D,F (e.g. 512,32768) or 'any'"

# Sites, in the order asked for, without repeats.
IFS=',' read -r -a kinds <<<"${kinds_arg// /}"
((${#kinds[@]})) || die "--kinds is empty; use a subset of attn,mlp,resid"
for kind in "${kinds[@]}"; do
  case $kind in
    attn | mlp | resid) ;;
    *) die "unknown kind '$kind' in --kinds; use a subset of attn,mlp,resid" ;;
  esac
done

sites=()
add_site() {
  local site
  for site in ${sites[@]+"${sites[@]}"}; do
    [[ $site == "$1" ]] && return 0
  done
  sites+=("$1")
}
IFS=',' read -r -a layer_items <<<"${layers_arg// /}"
((${#layer_items[@]})) || die "--layers is empty; use e.g. --layers embed,2"
for item in "${layer_items[@]}"; do
  if [[ $item == embed ]]; then
    add_site embed
  elif [[ $item =~ ^[0-9]+$ ]] && ((10#$item < N_LAYERS)); then
    for kind in "${kinds[@]}"; do
      add_site "${kind}_out_layer$((10#$item))"
    done
  elif [[ $item =~ ^(attn|mlp|resid)_out_layer[0-9]+$ ]] && ((10#${item##*layer} < N_LAYERS)); then
    add_site "$item"
  else
    die "unknown layer '$item' in --layers; use embed, 0..$((N_LAYERS - 1)), or a site name such as mlp_out_layer1"
  fi
done

case $source_arg in
  auto)
    if [[ $set_name == 10_32768 && ${#sites[@]} -eq $((1 + 3 * N_LAYERS)) ]]; then
      source_arg=hf
    else
      source_arg=tree
    fi
    ;;
  hf | tree) ;;
  *) die "unknown --source '$source_arg'; use hf, tree or auto" ;;
esac

downloader="${DL_DOWNLOADER:-}"
if [[ -z $downloader ]]; then
  if command -v curl >/dev/null 2>&1; then
    downloader=curl
  elif command -v wget >/dev/null 2>&1; then
    downloader=wget
  else
    die "neither curl nor wget is installed; install one (e.g. 'apt-get install curl') and re-run"
  fi
fi
case $downloader in
  curl | wget)
    command -v "$downloader" >/dev/null 2>&1 \
      || die "DL_DOWNLOADER=$downloader but $downloader is not installed; install it or unset DL_DOWNLOADER"
    ;;
  *) die "DL_DOWNLOADER='$downloader' must be curl or wget" ;;
esac
if [[ -t 2 ]]; then
  curl_output=(--progress-bar)
  wget_output=(--quiet --show-progress)
else
  curl_output=(--silent --show-error)
  wget_output=(--no-verbose)
fi

[[ $target_dir == / ]] || target_dir=${target_dir%/}
root="$target_dir/$MODEL"

# ------------------------------------------------------------------------------------------------
# Downloads
# ------------------------------------------------------------------------------------------------
http_code=""

wget_status() {  # final HTTP status of URL $1 as wget sees it, 000 if no answer
  wget --spider --server-response --tries=1 --timeout=60 "$1" 2>&1 \
    | awk '$1 ~ /^HTTP\// { code = $2 } END { print (code == "" ? "000" : code) }' || true
}

# transfer URL PART: fetch URL into PART, continuing from PART's current size. Sets http_code.
transfer() {
  local url=$1 part=$2 rc=0
  http_code=""
  if [[ $downloader == curl ]]; then
    http_code=$(curl --location --fail "${curl_output[@]}" --connect-timeout 30 \
      --speed-limit 1 --speed-time 120 --continue-at - --output "$part" \
      --write-out '%{http_code}' "$url") || rc=$?
  else
    wget --continue --tries=1 --timeout=120 "${wget_output[@]}" --output-document="$part" \
      "$url" || rc=$?
    if ((rc == 8)); then  # the server answered with an error status
      http_code=$(wget_status "$url")
    fi
  fi
  return "$rc"
}

# fetch URL DEST: download URL to DEST through DEST.part, resuming a DEST.part left by an
# interrupted transfer. DEST appears only once complete, so an existing DEST is skipped.
fetch() {
  local url=$1 dest=$2 part="$2.part" attempt rc size_before
  if [[ -f $dest ]]; then
    log "  have $dest"
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  if [[ -s $part ]]; then
    log "  resume $url ($(human_size "$(file_size "$part")") already in $part)"
  else
    log "  get  $url"
  fi
  for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
    size_before=$(file_size "$part")
    rc=0
    transfer "$url" "$part" || rc=$?
    if ((rc == 0)); then
      mv -f "$part" "$dest"
      return 0
    fi
    [[ -s $part ]] || rm -f "$part"
    if [[ $rc == 33 || $http_code == 416 ]]; then
      warn "the server cannot resume $part from byte $size_before; starting it over"
      rm -f "$part"
      continue
    fi
    if [[ $http_code == 4?? ]]; then
      die "HTTP $http_code for $url
  Check --set '$set_name' and --layers (not every set has every submodule), try the other
  --source (hf or tree), or point DL_HF_BASE_URL / DL_TREE_BASE_URL at a mirror."
    fi
    if ((attempt < ATTEMPTS)); then
      warn "transfer of $url stopped ($downloader exit $rc${http_code:+, HTTP $http_code}); resuming (attempt $((attempt + 1))/$ATTEMPTS)"
      if (($(file_size "$part") <= size_before)); then
        sleep "$attempt"
      fi
    fi
  done
  die "could not download $url after $ATTEMPTS attempts ($downloader exit $rc${http_code:+, HTTP $http_code}).
  What arrived is kept in $part: re-run the same command to resume."
}

fetch_text() {  # print the body of URL $1
  if [[ $downloader == curl ]]; then
    curl --location --fail --silent --show-error --connect-timeout 30 "$1"
  else
    wget --tries=1 --timeout=120 --quiet --output-document=- "$1"
  fi
}

checkpoint_names() {  # ae_STEP.pt names to fetch for the site at URL $1, by increasing step
  local listing names step
  if [[ -n $steps_arg ]]; then
    for step in ${steps_arg//,/ }; do
      printf 'ae_%s.pt\n' "$step"
    done
    return 0
  fi
  listing=$(fetch_text "$1/checkpoints/") \
    || die "could not list the checkpoints at $1/checkpoints/; pass the steps with --steps 0,1000,..."
  names=$(printf '%s\n' "$listing" | grep -oE 'ae_[0-9]+\.pt' | sort -u -t_ -k2,2n || true)
  [[ -n $names ]] \
    || die "the listing of $1/checkpoints/ names no ae_STEP.pt file; pass the steps with --steps 0,1000,..."
  printf '%s\n' "$names"
}

any_python() {  # first interpreter that runs at all (for unpacking the zip without unzip)
  local candidate
  for candidate in ${python_arg:+"$python_arg"} ${PYTHON:+"$PYTHON"} python3 python; do
    if "$candidate" -c '' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

zip_list() {
  if command -v unzip >/dev/null 2>&1; then
    unzip -Z1 "$1"
  else
    "$zip_python" -c 'import sys, zipfile; print("\n".join(zipfile.ZipFile(sys.argv[1]).namelist()))' "$1"
  fi
}

zip_cat() {  # write entry $2 of zip $1 to stdout
  if command -v unzip >/dev/null 2>&1; then
    unzip -p "$1" "$2"
  else
    "$zip_python" -c 'import shutil, sys, zipfile; shutil.copyfileobj(zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]), sys.stdout.buffer)' "$1" "$2"
  fi
}

install_from_zip() {
  local zip_name zip_path entries entry site file dest missing=()
  zip_name="dictionaries_${MODEL}_${set_name%%_*}.zip"
  zip_path="$target_dir/$zip_name"
  for site in "${sites[@]}"; do
    for file in ae.pt config.json; do
      [[ -f $root/$site/$set_name/$file ]] || missing+=("$site/$file")
    done
  done
  if ((${#missing[@]} == 0)); then
    log "  have all selected files of $zip_name"
    return 0
  fi
  if ! command -v unzip >/dev/null 2>&1; then
    zip_python=$(any_python) || die "unpacking the zip needs unzip or python; install one, or use --source tree"
  fi
  fetch "$HF_BASE_URL/$zip_name" "$zip_path"
  entries=$(zip_list "$zip_path") \
    || die "$zip_path is not a readable zip; delete it and re-run (or use --source tree)"
  for item in "${missing[@]}"; do
    site=${item%/*}
    file=${item##*/}
    entry=$(printf '%s\n' "$entries" | awk -v suffix="$MODEL/$site/$set_name/$file" '
      { n = length($0); m = length(suffix) }
      !found && ($0 == suffix || (n > m && substr($0, n - m) == "/" suffix)) { print; found = 1 }')
    [[ -n $entry ]] || die "$zip_name has no entry ending in $MODEL/$site/$set_name/$file; its entries look like:
$(printf '%s\n' "$entries" | sed -n '1,3p')"
    dest="$root/$site/$set_name/$file"
    mkdir -p "$(dirname "$dest")"
    log "  unzip $entry"
    zip_cat "$zip_path" "$entry" >"$dest.part" || die "could not unpack $entry from $zip_path"
    mv -f "$dest.part" "$dest"
  done
  if ((keep_zip)); then
    log "  kept $zip_path"
  else
    rm -f "$zip_path"
  fi
}

log "$PROG: set $set_name of $MODEL, ${#sites[@]} submodule(s), source $source_arg ($downloader), into $root"
if [[ $source_arg == hf ]]; then
  install_from_zip
else
  for site in "${sites[@]}"; do
    fetch "$TREE_BASE_URL/$MODEL/$site/$set_name/ae.pt" "$root/$site/$set_name/ae.pt"
    fetch "$TREE_BASE_URL/$MODEL/$site/$set_name/config.json" "$root/$site/$set_name/config.json"
  done
fi
if ((want_checkpoints)); then
  for site in "${sites[@]}"; do
    site_url="$TREE_BASE_URL/$MODEL/$site/$set_name"
    names=$(checkpoint_names "$site_url")
    for name in $names; do
      fetch "$site_url/checkpoints/$name" "$root/$site/$set_name/checkpoints/$name"
    done
  done
fi

# ------------------------------------------------------------------------------------------------
# Check and summary
# ------------------------------------------------------------------------------------------------
print_sizes() {  # the summary table without shapes, for when no check runs
  local site path total=0 size
  printf '%-18s %-24s %-14s %s\n' site file 'shape (D x F)' size
  for site in "${sites[@]}"; do
    for path in "$root/$site/$set_name"/ae.pt "$root/$site/$set_name"/config.json \
      "$root/$site/$set_name"/checkpoints/ae_*.pt; do
      [[ -f $path ]] || continue
      size=$(file_size "$path")
      total=$((total + size))
      printf '%-18s %-24s %-14s %s\n' "$site" "${path#"$root/$site/$set_name/"}" "-" "$(human_size "$size")"
    done
  done
  printf 'total %s in %s\n' "$(human_size "$total")" "$root"
}

torch_python() {  # first interpreter that can import torch
  local candidate
  for candidate in ${python_arg:+"$python_arg"} ${PYTHON:+"$PYTHON"} python3 python; do
    if "$candidate" -c 'import torch' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
    if [[ -n $python_arg || -n ${PYTHON:-} ]]; then
      return 1  # an interpreter was named: do not silently use another one
    fi
  done
  return 1
}

checker="$SCRIPT_DIR/scripts/verify_download.py"
if ((!verify)); then
  print_sizes
elif [[ ! -f $checker ]]; then
  warn "$checker is missing (it ships next to this script); skipping the check of the files"
  print_sizes
elif ! python_bin=$(torch_python); then
  warn "no python with torch found (tried: ${python_arg:-${PYTHON:-python3, python}}); set --python or PYTHON to check the files; skipping the check"
  print_sizes
else
  "$python_bin" "$checker" --root "$root" --set "$set_name" --expect-shape "$expect_shape" "${sites[@]}" \
    || die "some downloaded files failed the check (see above); delete them and re-run to fetch them again"
fi
log "done. Load a dictionary with:
  from dictionary_learning import AutoEncoder
  ae = AutoEncoder.from_pretrained(\"$root/${sites[0]}/$set_name/ae.pt\")"
