"""The embedded demo data: synthetic, SIIM-like chest radiographs with pneumothorax regions
(:mod:`~pneumoseg.demo.phantom`, drawn with :mod:`~pneumoseg.demo.canvas`,
:mod:`~pneumoseg.demo.anatomy` and :mod:`~pneumoseg.demo.lesions`), written as a real DICOM
data set in the competition's layout (:mod:`~pneumoseg.demo.dataset`,
:mod:`~pneumoseg.demo.dicom_writer`)."""
