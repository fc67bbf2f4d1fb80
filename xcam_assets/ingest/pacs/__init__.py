"""New studies from the hospital's PACS: a DICOMweb puller (QIDO-RS + WADO-RS) and a
DICOM C-STORE receiver. Both hand over plain arrival batches under `data/incoming/`
(staged, then renamed into place complete), so ingest treats them like any batch."""
