"""dinoapp domains: files -> (array float32 [C, H, W], meta dict) and back.

numpy + rasterio + pydicom only (no torch, no dinoapp), so GIS and PACS scripts can use it alone.
The GeoTIFF and DICOM readers land with the domain-IO issue.
"""
