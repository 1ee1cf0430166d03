# Sourced by the demo scripts: replace a previous demo run in $OUTPUT_DIR, and
# nothing else. The trainer refuses an output directory that holds an earlier
# run; a demo passes --overwrite_output_dir only when model.ckpt there is still
# the one a demo wrote (its checksum is kept beside it).
DEMO_MARK="$OUTPUT_DIR/.demo_model_ckpt.cksum"
ckpt_sum() { if [ -f "$OUTPUT_DIR/model.ckpt" ]; then cksum < "$OUTPUT_DIR/model.ckpt"; fi; }

# Runs "$@" (a gpt2_train_main.py command line) with --overwrite_output_dir
# when it replaces a demo's own run, then marks the model.ckpt it wrote.
run_demo_training() {
    local before after status=0 overwrite=()
    before="$(ckpt_sum)"
    if [ -n "$before" ] && [ -f "$DEMO_MARK" ] && [ "$before" = "$(cat "$DEMO_MARK")" ]; then
        echo "(replacing the previous demo run in $OUTPUT_DIR)"
        overwrite=(--overwrite_output_dir)
    fi
    "$@" --output_dir "$OUTPUT_DIR" "${overwrite[@]}" || status=$?
    after="$(ckpt_sum)"
    if [ -n "$after" ] && [ "$after" != "$before" ]; then  # written by this run (Ctrl-C too)
        echo "$after" > "$DEMO_MARK"
    fi
    return "$status"
}
