"""Two-tier registration from anatomical passports (world mm, RAS+; arrays (x, y, z)).

- registration.options: RigidOptions, DeformableOptions (every parameter; recorded as dataclasses.asdict)
- registration.two_tier.register_passports(fixed, moving, rigid_options, deformable_options) -> (rigid,
  deformable, Transform): the one rigid -> TPS -> Transform pipeline
- registration.rigid.register_rigid(fixed, moving, options) -> RigidResult   (MOVING -> FIXED world mm)
- registration.deformable.register_deformable(fixed, moving, rigid, options) -> DeformableResult (TPS grid);
  its phases: registration.correspondence (points, matching), registration.spline (cells, grid),
  registration.spline_system (the linearised point-to-plane TPS solve) and registration.validation (the
  smoothing chosen by k-fold cross-validation, the spline kept only where held-out matches say it helps)
- registration.transform: Transform (points both ways, save/load JSON), warp_labels, warp_image
- registration.stability: the anatomical stability weight table
- registration.provenance.check_inputs(fixed, path, moving, path) -> the inputs' model/weights record and
  mismatches (a stand-in/official mix: InputError unless allow_mixed_weights), kept in both JSON outputs
- accuracy harness: registration.synthetic (known truths, moving scans), registration.breathing (a known
  breathing motion), registration.accuracy (TRE, Dice, folding), registration.harness (cases, timing),
  registration.eval_inputs (both real label maps, the clinical-size variant), registration.batch (exp/insp pairs)
- CLIs: registration/register.py (register two passports), registration/evaluate.py (accuracy harness)
"""
