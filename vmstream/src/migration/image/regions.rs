//! The temporary images of guest memory's regions after the first (a QEMU VM's several RAM
//! backends, each received into its own file): sized from the source's region table, mapped
//! after the first region's image, and synced and renamed with it at the commit.

use std::path::PathBuf;

use super::{ImageError, PendingImage, Reservation};

/// The pending images of memory's regions after the first, in order.
pub struct RegionImages {
    images: Vec<PendingImage>,
}

impl RegionImages {
    /// Sizes each claimed file to its region's size (`claims` and `sizes` in order).
    pub fn create(claims: Vec<Reservation>, sizes: &[u64]) -> Result<RegionImages, ImageError> {
        let images = claims
            .into_iter()
            .zip(sizes)
            .map(|(claim, &size)| PendingImage::create(claim, size))
            .collect::<Result<_, _>>()?;
        Ok(RegionImages { images })
    }

    /// The images, in order.
    pub fn images(&self) -> &[PendingImage] {
        &self.images
    }

    /// The temporary images' paths, in order.
    pub fn temp_paths(&self) -> Vec<PathBuf> {
        self.images
            .iter()
            .map(|i| i.temp_path().to_path_buf())
            .collect()
    }

    /// Syncs every image to its file system (before any is renamed).
    pub fn sync(&self) -> Result<(), ImageError> {
        self.images.iter().try_for_each(PendingImage::sync)
    }

    /// Renames every image over its target.
    pub fn commit(self) -> Result<(), ImageError> {
        for image in self.images {
            image.commit()?;
        }
        Ok(())
    }
}
