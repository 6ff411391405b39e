terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.40"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }

  # Keep state remote and locked in a real deployment, e.g.:
  # backend "s3" {
  #   bucket         = "example-terraform-state"
  #   key            = "companion/terraform.tfstate"
  #   region         = "eu-west-1"
  #   dynamodb_table = "terraform-locks"
  #   encrypt        = true
  # }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = {
      Project     = "companion"
      Environment = var.environment
      ManagedBy   = "terraform"
    }
  }
}
