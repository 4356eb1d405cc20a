"""The operations task's data: OpenPack-layout readers and writers (openpack), clip labelling and subject splits
(clips), the synthetic packing bench (synthetic)."""
