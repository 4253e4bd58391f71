"""Two-tier registration from anatomical passports (world mm, RAS+; arrays (x, y, z)).

- registration.rigid.register_rigid(fixed, moving) -> RigidResult   (MOVING -> FIXED world mm)
- registration.deformable.register_deformable(fixed, moving, rigid) -> DeformableResult (TPS grid)
- registration.deformable.to_transform(rigid, deformable) -> transform.Transform
- registration.transform: Transform (points both ways, save/load JSON), warp_labels, warp_image
- registration.stability: the anatomical stability weight table
- CLIs: registration/register.py (register two passports), registration/evaluate.py (accuracy harness)
"""
