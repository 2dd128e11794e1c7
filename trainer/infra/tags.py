"""The MLflow tags dldkd sets: written by the recipe and the sweep, read back by ``dldkd report``
(and by the tracker, which finds a run again by its key), so both sides spell them alike."""

RUN_KEY_TAG = "dldkd.run_key"          # the run name: a restarted run appends to its own run
KIND_TAG = "dldkd.kind"                # SWEEP_KIND on a sweep's parent run
SWEEP_KIND = "sweep"
SWEEP_TAG = "dldkd.sweep"              # the sweep's name, on its parent run
BEST_TRIAL_TAG = "dldkd.best_trial"    # on the parent run: the trial with the best metric
VARIANT_TAG = "dldkd.variant"          # on a trial's run: its sweep variant
VAL_IS_TEST_TAG = "dldkd.val_is_test"  # "true": model selection ran on the test split
WORLD_SIZE_TAG = "dldkd.world_size"    # on a run: its worker count (the latest launch's)
NODE_RANKS_TAG = "dldkd.node_ranks"    # on a run: JSON list, the node rank of each worker
RESUME_CHANGED_PREFIX = "dldkd.resume_changed."   # + key: "old -> new" for a relaunch's changes
BEST_CHECKPOINT_TAG = "dldkd.best_checkpoint"      # where the best weights were saved
REGISTERED_MODEL_TAG = "dldkd.registered_model"    # models:/NAME/VERSION of the run's model
